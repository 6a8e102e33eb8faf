{{/* The release's name, with the chart's appended unless it already holds it. */}}
{{- define "greenlight.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; call with (dict "ctx" $ "component" "server"). */}}
{{- define "greenlight.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "greenlight.selectorLabels" . }}
{{- end -}}

{{/* The labels a component's pods are selected by. */}}
{{- define "greenlight.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "greenlight.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Where the server's Redis comes from: external, bundled (trial) or none (embedded). */}}
{{- define "greenlight.redisMode" -}}
{{- $external := or .Values.redis.url .Values.redis.existingSecret -}}
{{- if and $external .Values.redis.bundled.enabled -}}
{{- fail "redis.url or redis.existingSecret is set: also set redis.bundled.enabled=false (the bundled Redis is for trials only)" -}}
{{- else if $external -}}
external
{{- else if .Values.redis.bundled.enabled -}}
bundled
{{- else -}}
embedded
{{- end -}}
{{- end -}}

{{/* The server's configuration file: server.config with what the chart owns filled in. */}}
{{- define "greenlight.serverConfig" -}}
{{- $config := deepCopy (.Values.server.config | default dict) -}}
{{- range $key, $use := dict "listen" "server.grpcPort and server.httpPort" "tls" "tls.secretName" "redis" "redis.*" -}}
{{- if hasKey $config $key -}}
{{- fail (printf "server.config.%s is the chart's: use %s" $key $use) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "listen" (dict "grpc" (printf "0.0.0.0:%v" .Values.server.grpcPort) "http" (printf "0.0.0.0:%v" .Values.server.httpPort)) -}}
{{- if ne (include "greenlight.redisMode" .) "embedded" -}}
{{- $_ := set $config "redis" (dict "key_prefix" .Values.redis.keyPrefix) -}}
{{- end -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $config "tls" (dict "cert_file" "/etc/greenlight/tls/tls.crt" "key_file" "/etc/greenlight/tls/tls.key") -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The server's gRPC address as the agent dials it. */}}
{{- define "greenlight.agentServer" -}}
{{- if .Values.agent.server -}}
{{- .Values.agent.server -}}
{{- else -}}
{{- printf "%s://%s-server.%s.svc:%v" (ternary "https" "http" (not (empty .Values.tls.secretName))) (include "greenlight.fullname" .) .Release.Namespace .Values.server.grpcPort -}}
{{- end -}}
{{- end -}}
