//go:build tools

// Package tools pins kwok, which plays the kubelet for the end-to-end tests' nodes. It has a
// module of its own because it builds against older Kubernetes libraries than the control
// plane in the parent module.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
