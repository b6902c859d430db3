{{/* Names and labels. */}}
{{- define "lora-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lora-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lora-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lora-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lora-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where the adapter store is: the S3 URL, or a folder on the local volume. */}}
{{- define "lora-gateway.localStorePath" -}}/var/lib/lora-gateway/store{{- end }}

{{- define "lora-gateway.storeUrl" -}}
{{- default (printf "file://%s" (include "lora-gateway.localStorePath" .)) .Values.store.url }}
{{- end }}

{{/* The Secret with the S3 credentials, if any. */}}
{{- define "lora-gateway.s3SecretName" -}}
{{- with .Values.store.s3.credentials }}
{{- if .existingSecret }}
{{- .existingSecret }}
{{- else if .accessKeyId }}
{{- printf "%s-s3" (include "lora-gateway.fullname" $) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret with the API keys file (auth.mode apiKeys). */}}
{{- define "lora-gateway.keysSecretName" -}}
{{- default (printf "%s-keys" (include "lora-gateway.fullname" .)) .Values.auth.apiKeys.existingSecret }}
{{- end }}

{{- define "lora-gateway.keysSecretKey" -}}
{{- if .Values.auth.apiKeys.existingSecret }}{{ .Values.auth.apiKeys.existingSecretKey }}{{ else }}keys.yaml{{ end }}
{{- end }}

{{- define "lora-gateway.keysMountPath" -}}/etc/lora-gateway/keys{{- end }}

{{/* A setting as an environment variable's text. YAML numbers reach templates as floats:
     10737418240 would print as 1.073741824e+10, which the gateway's integer settings refuse. */}}
{{- define "lora-gateway.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ . | int64 }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The drain timeout the gateway will use: the setting, else its default (gateway/settings.py). */}}
{{- define "lora-gateway.drainTimeoutSeconds" -}}
{{- $drain := 30 }}
{{- if hasKey .Values.settings "drain_timeout_s" }}{{ $drain = .Values.settings.drain_timeout_s }}{{ end }}
{{- ceil $drain | int }}
{{- end }}

{{- define "lora-gateway.terminationGracePeriodSeconds" -}}
{{- $floor := add .Values.shutdown.preStopSleepSeconds (include "lora-gateway.drainTimeoutSeconds" . | int) }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add $floor 15 }}
{{- else if lt (int .Values.shutdown.terminationGracePeriodSeconds) (int $floor) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%v) must be at least shutdown.preStopSleepSeconds + settings.drain_timeout_s (%v), or in-flight requests are killed before they finish" .Values.shutdown.terminationGracePeriodSeconds $floor) }}
{{- else }}
{{- .Values.shutdown.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/* Refuse combinations that render fine but cannot work. */}}
{{- define "lora-gateway.validate" -}}
{{- $replicas := .Values.replicaCount | int }}
{{- if .Values.autoscaling.enabled }}{{ $replicas = .Values.autoscaling.maxReplicas | int }}{{ end }}
{{- if and (not .Values.store.url) (gt $replicas 1) }}
{{- fail "store.url is empty (a folder inside one pod): replicas must share an S3 store, set store.url=s3://bucket/prefix" }}
{{- end }}
{{- if and (eq .Values.auth.mode "trustedHeader") (not .Values.auth.trustedHeader.userHeader) }}
{{- fail "auth.mode trustedHeader needs auth.trustedHeader.userHeader" }}
{{- end }}
{{- if and .Values.model.download.enabled (not .Values.model.download.repoId) }}
{{- fail "model.download.enabled needs model.download.repoId" }}
{{- end }}
{{- if and .Values.store.s3.credentials.accessKeyId (not .Values.store.s3.credentials.secretAccessKey) (not .Values.store.s3.credentials.existingSecret) }}
{{- fail "store.s3.credentials.accessKeyId needs store.s3.credentials.secretAccessKey" }}
{{- end }}
{{- if and .Values.inferencePool.enabled (not .Values.store.url) }}
{{- fail "inferencePool.enabled spreads requests over replicas: they must share an S3 store (store.url)" }}
{{- end }}
{{- if and .Values.inferencePool.enabled (not .Values.metrics.port) }}
{{- fail "inferencePool.enabled needs metrics.port (e.g. 9090): the endpoint picker reads adapter names there, /metrics on the API port names none" }}
{{- end }}
{{- end }}
