{{/*
Names, labels and small helpers shared by every template. Helpers that take a component are
called with (dict "root" $ "component" "<coordinator|ingestor|refiner|aggregator>").
*/}}

{{- define "medallion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; a release named after the chart is not repeated. */}}
{{- define "medallion.fullname" -}}
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

{{- define "medallion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <fullname>-<component>; the prefix is cut so "<...>-aggregator-headless" fits 63 characters. */}}
{{- define "medallion.componentFullname" -}}
{{- printf "%s-%s" (include "medallion.fullname" .root | trunc 40 | trimSuffix "-") .component }}
{{- end }}

{{- define "medallion.headlessName" -}}
{{- printf "%s-headless" (include "medallion.componentFullname" .) }}
{{- end }}

{{- define "medallion.labels" -}}
helm.sh/chart: {{ include "medallion.chart" . }}
{{ include "medallion.releaseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medallion
{{- end }}

{{/* Every pod of this release (NetworkPolicy peers). */}}
{{- define "medallion.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "medallion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "medallion.selectorLabels" -}}
{{ include "medallion.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "medallion.componentLabels" -}}
{{ include "medallion.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "medallion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "medallion.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "medallion.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "medallion.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* URL of a layer service's headless Service: DNS returns every ready replica. */}}
{{- define "medallion.layerURL" -}}
{{- $root := .root }}
{{- printf "%s://%s.%s.svc.%s:%v" (include "medallion.scheme" $root) (include "medallion.headlessName" .) $root.Release.Namespace $root.Values.clusterDomain (index $root.Values .component).port }}
{{- end }}

{{/* "true" when the lake is object storage, so no lake volume is mounted. */}}
{{- define "medallion.lakeIsS3" -}}
{{- if hasPrefix "s3://" .Values.lake.uri }}true{{ end }}
{{- end }}

{{/* Where the lake volume is mounted: the lake path itself. */}}
{{- define "medallion.lakeMountPath" -}}
{{- $path := trimPrefix "file://" .Values.lake.uri }}
{{- if not (hasPrefix "/" $path) }}
{{- fail (printf "lake.uri must be an absolute path, a file:// URL or an s3:// URI, not %q" .Values.lake.uri) }}
{{- end }}
{{- $path }}
{{- end }}

{{- define "medallion.lakeClaimName" -}}
{{- default (printf "%s-lake" (include "medallion.fullname" .)) .Values.lake.persistence.existingClaim }}
{{- end }}

{{- define "medallion.stateClaimName" -}}
{{- default (printf "%s-state" (include "medallion.componentFullname" (dict "root" . "component" "coordinator"))) .Values.coordinator.persistence.existingClaim }}
{{- end }}

{{/* Refuses values the chart cannot honour; included once, by the coordinator's template. */}}
{{- define "medallion.validate" -}}
{{- if ne (int .Values.coordinator.replicas) 1 }}
{{- fail "coordinator.replicas must be 1: the coordinator is the single writer of its embedded store" }}
{{- end }}
{{- if and .Values.coordinator.autoscaling .Values.coordinator.autoscaling.enabled }}
{{- fail "coordinator.autoscaling is not supported: the coordinator is the single writer of its embedded store" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret that also holds ca.crt)" }}
{{- end }}
{{- if and .Values.tls.mutual (not .Values.tls.enabled) }}
{{- fail "tls.mutual needs tls.enabled" }}
{{- end }}
{{- if and .Values.auth.existingSecret (not .Values.auth.tokenKey) }}
{{- fail "auth.existingSecret needs auth.tokenKey" }}
{{- end }}
{{- if and .Values.warehouse.existingSecret (not (and .Values.warehouse.urlKey .Values.warehouse.envName)) }}
{{- fail "warehouse.existingSecret needs warehouse.urlKey and warehouse.envName" }}
{{- end }}
{{- if not (include "medallion.lakeIsS3" .) }}
{{- $_ := include "medallion.lakeMountPath" . }}
{{- end }}
{{- end }}
