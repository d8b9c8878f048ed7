{{/*
The objects every service gets, written once. Each takes
(dict "root" $ "component" "<coordinator|ingestor|refiner|aggregator>").
*/}}

{{/* host:port for a listen address; IPv6 hosts get brackets. */}}
{{- define "medallion.listen" -}}
{{- $host := .host }}
{{- if contains ":" $host }}
{{- printf "[%s]:%v" $host .port }}
{{- else }}
{{- printf "%s:%v" $host .port }}
{{- end }}
{{- end }}

{{/* The gRPC service a liveness probe asks for: it stays SERVING while the server drains. */}}
{{- define "medallion.apiServiceName" -}}
{{- if eq . "coordinator" }}medallion.v1.PipelineService{{ else }}medallion.v1.StageService{{ end }}
{{- end }}

{{/* A probe's action: native gRPC health, or a TCP connect when TLS is on (the kubelet's gRPC
probe speaks plaintext only). */}}
{{- define "medallion.probeAction" -}}
{{- $root := .ctx.root -}}
{{- if $root.Values.tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ (index $root.Values .ctx.component).port }}
  {{- if .service }}
  service: {{ .service }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Environment shared by every service: logging, tracing, metrics, TLS. */}}
{{- define "medallion.commonEnv" -}}
{{- $root := .root -}}
- name: RUST_LOG
  value: {{ $root.Values.logLevel | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: medallion-{{ .component }}
{{- if $root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $root.Values.otel.endpoint | quote }}
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $root.Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $root.Values.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
{{- if $root.Values.metrics.enabled }}
- name: MEDALLION_METRICS_LISTEN
  value: {{ include "medallion.listen" (dict "host" $root.Values.listenHost "port" $root.Values.metrics.port) | quote }}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: MEDALLION_TLS_CERT
  value: /etc/medallion/tls/tls.crt
- name: MEDALLION_TLS_KEY
  value: /etc/medallion/tls/tls.key
- name: MEDALLION_TLS_CA
  value: /etc/medallion/tls/ca.crt
{{- if $root.Values.tls.mutual }}
- name: MEDALLION_TLS_CLIENT_AUTH
  value: "true"
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of one service: its clap flags (MEDALLION_*), then extraEnv. */}}
{{- define "medallion.componentEnv" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c -}}
- name: MEDALLION_{{ upper $c }}_LISTEN
  value: {{ include "medallion.listen" (dict "host" $root.Values.listenHost "port" $v.port) | quote }}
{{- if eq $c "coordinator" }}
- name: MEDALLION_STATE_DIR
  value: /var/lib/medallion/state
- name: MEDALLION_INGESTOR_URL
  value: {{ include "medallion.layerURL" (dict "root" $root "component" "ingestor") | quote }}
- name: MEDALLION_REFINER_URL
  value: {{ include "medallion.layerURL" (dict "root" $root "component" "refiner") | quote }}
- name: MEDALLION_AGGREGATOR_URL
  value: {{ include "medallion.layerURL" (dict "root" $root "component" "aggregator") | quote }}
{{- if $root.Values.pipelines }}
- name: MEDALLION_PIPELINES_DIR
  value: /etc/medallion/pipelines
{{- end }}
{{- if $root.Values.auth.existingSecret }}
- name: MEDALLION_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.auth.existingSecret | quote }}
      key: {{ $root.Values.auth.tokenKey | quote }}
{{- end }}
{{- else }}
- name: MEDALLION_LAKE
  value: {{ $root.Values.lake.uri | quote }}
- name: MEDALLION_{{ upper $c }}_MAX_TASKS
  value: {{ $v.maxTasks | quote }}
{{- with $root.Values.s3.region }}
- name: MEDALLION_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.s3.endpoint }}
- name: MEDALLION_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if $root.Values.s3.pathStyle }}
- name: MEDALLION_S3_PATH_STYLE
  value: "true"
{{- end }}
{{- end }}
{{- if eq $c "refiner" }}
- name: MEDALLION_BRONZE_FLIGHT
  value: {{ include "medallion.layerURL" (dict "root" $root "component" "ingestor") | quote }}
- name: MEDALLION_REFINER_BUCKET_ROWS
  value: {{ $v.bucketRows | int64 | quote }}
{{- end }}
{{- if eq $c "aggregator" }}
- name: MEDALLION_SILVER_FLIGHT
  value: {{ include "medallion.layerURL" (dict "root" $root "component" "refiner") | quote }}
{{- if $root.Values.warehouse.existingSecret }}
- name: {{ $root.Values.warehouse.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.warehouse.existingSecret | quote }}
      key: {{ $root.Values.warehouse.urlKey | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "medallion.deployment" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c }}
{{- $lakeVolume := and (ne $c "coordinator") (not (include "medallion.lakeIsS3" $root)) }}
{{- $secretEnv := or (and (eq $c "coordinator") $root.Values.auth.existingSecret) (and (eq $c "aggregator") $root.Values.warehouse.existingSecret) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "medallion.componentFullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
  {{- if $secretEnv }}
  annotations:
    checkov.io/skip1: "CKV_K8S_35=The service takes this secret as an environment variable: its clap flag, or the variable a spec's url_env names"
  {{- end }}
spec:
  {{- if eq $c "coordinator" }}
  # One writer of the embedded store: never two pods at once, not even during a rollout.
  replicas: 1
  strategy:
    type: Recreate
  {{- else }}
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "medallion.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "medallion.componentLabels" . | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- if and $root.Values.metrics.enabled $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metrics.port | quote }}
        prometheus.io/path: {{ $root.Values.metrics.path | quote }}
        {{- end }}
        {{- if and (eq $c "coordinator") $root.Values.pipelines }}
        # Specs are applied at start: a changed spec restarts the coordinator.
        checksum/pipelines: {{ toYaml $root.Values.pipelines | sha256sum }}
        {{- end }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "medallion.serviceAccountName" $root }}
      # The services never call the Kubernetes API (IRSA projects its own token).
      automountServiceAccountToken: false
      # Service links would inject MEDALLION_*_PORT/_SERVICE_HOST variables into the
      # MEDALLION_ namespace the services read their flags from.
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      affinity:
        {{- if $v.affinity }}
        {{- toYaml $v.affinity | nindent 8 }}
        {{- else }}
        # Prefer spreading replicas over nodes, then zones.
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "medallion.selectorLabels" . | nindent 20 }}
            - weight: 50
              podAffinityTerm:
                topologyKey: topology.kubernetes.io/zone
                labelSelector:
                  matchLabels:
                    {{- include "medallion.selectorLabels" . | nindent 20 }}
        {{- end }}
      {{- with (default $root.Values.nodeSelector $v.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $v.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $c }}
          image: {{ include "medallion.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/usr/local/bin/medallion-{{ $c }}"]
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "medallion.commonEnv" . | nindent 12 }}
            {{- include "medallion.componentEnv" . | nindent 12 }}
          startupProbe:
            {{- include "medallion.probeAction" (dict "ctx" . "service" "") | nindent 12 }}
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          livenessProbe:
            {{- include "medallion.probeAction" (dict "ctx" . "service" (include "medallion.apiServiceName" $c)) | nindent 12 }}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            {{- include "medallion.probeAction" (dict "ctx" . "service" "") | nindent 12 }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if eq $c "coordinator" }}
            - name: state
              mountPath: /var/lib/medallion/state
            {{- if $root.Values.pipelines }}
            - name: pipelines
              mountPath: /etc/medallion/pipelines
              readOnly: true
            {{- end }}
            {{- end }}
            {{- if $lakeVolume }}
            - name: lake
              mountPath: {{ include "medallion.lakeMountPath" $root }}
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            - name: tls
              mountPath: /etc/medallion/tls
              readOnly: true
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $v.tmpSizeLimit | default $root.Values.tmp.sizeLimit }}
        {{- if eq $c "coordinator" }}
        - name: state
          {{- if $v.persistence.enabled }}
          persistentVolumeClaim:
            claimName: {{ include "medallion.stateClaimName" $root }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- if $root.Values.pipelines }}
        - name: pipelines
          configMap:
            name: {{ include "medallion.fullname" $root }}-pipelines
        {{- end }}
        {{- end }}
        {{- if $lakeVolume }}
        - name: lake
          persistentVolumeClaim:
            claimName: {{ include "medallion.lakeClaimName" $root }}
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $root.Values.tls.existingSecret }}
            # Readable by the service user through fsGroup only.
            defaultMode: 0440
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}

{{/* The ClusterIP (coordinator: configurable) Service: one stable address. */}}
{{- define "medallion.service" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "medallion.componentFullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
  {{- with (dig "service" "annotations" dict $v) }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if eq $c "coordinator" }}
  type: {{ $v.service.type }}
  {{- if and (eq $v.service.type "LoadBalancer") $v.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges:
    {{- toYaml $v.service.loadBalancerSourceRanges | nindent 4 }}
  {{- end }}
  {{- else }}
  type: ClusterIP
  {{- end }}
  selector:
    {{- include "medallion.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
{{- end }}

{{/* A headless Service: its DNS name resolves to every ready replica. */}}
{{- define "medallion.headlessService" -}}
{{- $root := .root }}
{{- $v := index $root.Values .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "medallion.headlessName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
spec:
  type: ClusterIP
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "medallion.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
{{- end }}

{{- define "medallion.hpa" -}}
{{- $root := .root }}
{{- $a := (index $root.Values .component).autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "medallion.componentFullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "medallion.componentFullname" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- if $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- end }}
  behavior:
    scaleDown:
      # A removed pod cancels its running tasks (the coordinator retries them elsewhere).
      stabilizationWindowSeconds: {{ $a.scaleDownStabilizationSeconds }}
      policies:
        - type: Pods
          value: 1
          periodSeconds: 120
{{- end }}

{{- define "medallion.pdb" -}}
{{- $root := .root }}
{{- $p := (index $root.Values .component).pdb -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "medallion.componentFullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
spec:
  {{- if $p.minAvailable }}
  minAvailable: {{ $p.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $p.maxUnavailable }}
  {{- end }}
  # A pod that is not ready serves nothing: evicting it never costs availability.
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "medallion.selectorLabels" . | nindent 6 }}
{{- end }}

{{/* Ingress only: egress targets (warehouse, OTLP collector, object storage) vary by site. */}}
{{- define "medallion.networkPolicy" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $np := $root.Values.networkPolicy -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "medallion.componentFullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medallion.componentLabels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "medallion.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    - ports:
        - port: grpc
          protocol: TCP
      {{- if eq $c "coordinator" }}
      {{- with $np.coordinatorFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- else }}
      from:
        - podSelector:
            matchLabels:
              {{- include "medallion.releaseSelectorLabels" $root | nindent 14 }}
        {{- with $np.layerExtraFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    {{- if $root.Values.metrics.enabled }}
    - ports:
        - port: metrics
          protocol: TCP
      {{- with $np.metricsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
{{- end }}
