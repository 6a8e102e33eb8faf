//go:build tools

// Package tools pins Helm, which the end-to-end tests use to lint and render the chart in
// deploy/helm and scripts/render-manifests uses to render deploy/manifests. It has a module
// of its own, as kwok does, because it builds against other Kubernetes libraries than the
// control plane in the parent module.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
