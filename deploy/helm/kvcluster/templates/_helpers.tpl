{{/* ------------------------------------------------------------ names */}}

{{/* Chart name, overridable. */}}
{{- define "kvcluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: <release>-<chart>, or the release alone when it contains the chart name. */}}
{{- define "kvcluster.fullname" -}}
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

{{/* RayCluster name: KubeRay derives pod and service names from it, so keep it short. */}}
{{- define "kvcluster.rayClusterName" -}}
{{- include "kvcluster.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "kvcluster.routerName" -}}
{{- printf "%s-router" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvcluster.redisName" -}}
{{- printf "%s-redis" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvcluster.configName" -}}
{{- printf "%s-config" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvcluster.secretName" -}}
{{- printf "%s-secret" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Ray's token Secret (key auth_token), given to KubeRay as authOptions.secretName. */}}
{{- define "kvcluster.rayAuthSecretName" -}}
{{- printf "%s-ray-auth" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* KubeRay's head Service: <RayCluster name>-head-svc. */}}
{{- define "kvcluster.rayHeadService" -}}
{{- printf "%s-head-svc" (include "kvcluster.rayClusterName" .) }}
{{- end }}

{{/* The Secret holding tls.crt / tls.key / ca.crt: an existing one, or the chart's. */}}
{{- define "kvcluster.tlsSecretName" -}}
{{- if .Values.security.tls.existingSecret }}
{{- .Values.security.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "kvcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the cluster-internal token: an existing one, or the chart's. */}}
{{- define "kvcluster.internalSecretName" -}}
{{- default (include "kvcluster.secretName" .) .Values.security.internal.existingSecret }}
{{- end }}

{{- define "kvcluster.internalSecretKey" -}}
{{- if .Values.security.internal.existingSecret }}
{{- .Values.security.internal.existingSecretKey }}
{{- else }}
{{- "internal-token" }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------ labels */}}

{{- define "kvcluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "kvcluster.labels" -}}
helm.sh/chart: {{ include "kvcluster.chart" . }}
{{ include "kvcluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvcluster
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that identify the release (selectors add app.kubernetes.io/component). */}}
{{- define "kvcluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvcluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ------------------------------------------------------------ images */}}

{{/* Image for a variant: include "kvcluster.image" (list . "cuda") */}}
{{- define "kvcluster.image" -}}
{{- $root := index . 0 }}
{{- $variant := index . 1 }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- printf "%s:%s-%s" $root.Values.image.repository $tag $variant }}
{{- end }}

{{/* ------------------------------------------------------------ paths */}}

{{- define "kvcluster.configDir" -}}/etc/kvcluster/config{{- end }}
{{- define "kvcluster.secretDir" -}}/etc/kvcluster/secret{{- end }}
{{- define "kvcluster.tlsDir" -}}/etc/kvcluster/tls{{- end }}
{{- define "kvcluster.internalDir" -}}/etc/kvcluster/internal{{- end }}
{{- define "kvcluster.internalTlsDir" -}}/etc/kvcluster/internal-tls{{- end }}
{{- define "kvcluster.runDir" -}}/run/kvcluster{{- end }}
{{- define "kvcluster.diskDir" -}}/var/cache/kvcluster/disk{{- end }}

{{/*
Shell that completes the cluster file inside a pod: the ConfigMap's cluster.yaml
with the Secret's security.yaml (tokens, Redis password) merged over it, validated,
written 0600 to the run dir.
*/}}
{{- define "kvcluster.renderConfigCmd" -}}
python -m kvcluster.deploy_config render {{ include "kvcluster.configDir" . }}/cluster.yaml --merge {{ include "kvcluster.secretDir" . }}/security.yaml -o {{ include "kvcluster.runDir" . }}/cluster.yaml
{{- end }}

{{/* ------------------------------------------------------------ Redis */}}

{{/* redis://[:password@]host:port without the db, or "" when no Redis. */}}
{{- define "kvcluster.redisBaseURL" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://:%s@%s:%d" (include "kvcluster.redisPassword" .) (include "kvcluster.redisName" .) (int .Values.redis.port) }}
{{- else }}
{{- .Values.redis.externalURL }}
{{- end }}
{{- end }}

{{/* The Redis password: the value, else the one already in the release's Secret, else a new one. */}}
{{- define "kvcluster.redisPassword" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kvcluster.secretName" .) }}
{{- if and $existing (index $existing.data "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- /* One value per render: cached on the root context so every template agrees. */}}
{{- if not (hasKey .Values.redis.auth "generated") }}
{{- $_ := set .Values.redis.auth "generated" (randAlphaNum 32) }}
{{- end }}
{{- .Values.redis.auth.generated }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Ray token: the value, else the one in the existing Secret, else a new one (kept across upgrades). */}}
{{- define "kvcluster.rayAuthToken" -}}
{{- if .Values.ray.auth.token }}
{{- .Values.ray.auth.token }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kvcluster.rayAuthSecretName" .) }}
{{- if and $existing (index $existing.data "auth_token") }}
{{- index $existing.data "auth_token" | b64dec }}
{{- else }}
{{- randAlphaNum 64 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The internal token: the value, else the one in the release's Secret, else a new one (kept across upgrades). */}}
{{- define "kvcluster.internalToken" -}}
{{- if .Values.security.internal.token }}
{{- .Values.security.internal.token }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kvcluster.secretName" .) }}
{{- if and $existing (index $existing.data "internal-token") }}
{{- index $existing.data "internal-token" | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------ cluster.yaml */}}

{{- define "kvcluster.gib" -}}
{{- mul (int64 .) 1073741824 }}
{{- end }}

{{/*
The public part of cluster.yaml (the ConfigMap): .Values.config with every field
the chart owns set from the values, so ports, paths and sizes match the
Services and volumes. Secrets (tokens, Redis password) are not in it; the
internal token is a file path, read in the worker pods that mount it.
*/}}
{{- define "kvcluster.clusterConfig" -}}
{{- $v := .Values }}
{{- $tls := $v.security.tls }}
{{- $itls := $v.security.internal.tls }}
{{- $idir := include "kvcluster.internalTlsDir" . }}
{{- $owned := dict
  "router" (dict "host" "0.0.0.0" "port" (int $v.router.grpcPort) "http_port" (int $v.router.httpPort)
                 "metrics_port" (int $v.router.metricsPort))
  "transfer" (dict "host" "0.0.0.0" "port" (int $v.transfer.port))
  "workers" (dict "num_prefill" (int $v.ray.prefill.replicas) "num_decode" (int $v.ray.decode.replicas)
                  "detached" (gt (int $v.router.replicas) 1))
  "store" (dict
    "device" (dict "capacity_bytes" (include "kvcluster.gib" $v.store.device.capacityGiB | int64) "policy" $v.store.device.policy)
    "host" (dict "capacity_bytes" (include "kvcluster.gib" $v.store.host.capacityGiB | int64) "policy" $v.store.host.policy)
    "disk" (dict "enabled" $v.store.disk.enabled "capacity_bytes" (include "kvcluster.gib" $v.store.disk.capacityGiB | int64)
                 "directory" (include "kvcluster.diskDir" .) "compression" $v.store.disk.compression)
    "redis" (dict "enabled" $v.store.redis.enabled "capacity_bytes" (include "kvcluster.gib" $v.store.redis.capacityGiB | int64)
                  "ttl_s" (int $v.store.redis.ttlSeconds)))
  "security" (dict
    "tls_cert" (ternary (printf "%s/tls.crt" (include "kvcluster.tlsDir" .)) "" $tls.enabled)
    "tls_key" (ternary (printf "%s/tls.key" (include "kvcluster.tlsDir" .)) "" $tls.enabled)
    "tls_ca" (ternary (printf "%s/ca.crt" (include "kvcluster.tlsDir" .)) "" (and $tls.enabled $tls.mutual))
    "tokens" (dict)
    "internal_token" ""
    "internal_token_file" (printf "%s/token" (include "kvcluster.internalDir" .))
    "internal_tls_cert" (ternary (printf "%s/tls.crt" $idir) "" $itls.enabled)
    "internal_tls_key" (ternary (printf "%s/tls.key" $idir) "" $itls.enabled)
    "internal_tls_ca" (ternary (printf "%s/ca.crt" $idir) "" $itls.enabled)
    "internal_tls_server_name" (ternary $itls.serverName "" $itls.enabled)) }}
{{- if $v.redis.enabled }}
{{- /* Without the password: the Secret's fragment replaces both URLs in each pod. */}}
{{- $public := printf "redis://%s:%d" (include "kvcluster.redisName" .) (int $v.redis.port) }}
{{- $_ := set $owned "redis_url" (printf "%s/0" $public) }}
{{- $_ := set (get $owned.store "redis") "url" (printf "%s/1" $public) }}
{{- end }}
{{- toYaml (mergeOverwrite (deepCopy $v.config) $owned) }}
{{- end }}

{{/* The secret part, merged over cluster.yaml in each pod: Redis URLs with the password, tokens. */}}
{{- define "kvcluster.securityFragment" -}}
{{- $base := include "kvcluster.redisBaseURL" . }}
{{- $frag := dict "security" (dict "tokens" .Values.security.tokens) }}
{{- if $base }}
{{- $_ := set $frag "redis_url" (printf "%s/0" $base) }}
{{- $_ := set $frag "store" (dict "redis" (dict "url" (printf "%s/1" $base))) }}
{{- end }}
{{- toYaml $frag }}
{{- end }}

{{/* ------------------------------------------------------------ pod pieces */}}

{{/* Container security context: non-root, no privilege escalation, no capabilities. */}}
{{- define "kvcluster.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* gRPC health probe body: native grpc without TLS, the image's checker with it. */}}
{{- define "kvcluster.grpcProbe" -}}
{{- $v := .Values }}
{{- if $v.security.tls.enabled }}
exec:
  command:
    - kvcluster-healthcheck
    - --addr
    - {{ printf "127.0.0.1:%d" (int $v.router.grpcPort) | quote }}
    - --tls-ca
    - {{ include "kvcluster.tlsDir" . }}/ca.crt
    - --tls-server-name
    - {{ include "kvcluster.routerName" . }}
    {{- if $v.security.tls.mutual }}
    - --tls-cert
    - {{ include "kvcluster.tlsDir" . }}/tls.crt
    - --tls-key
    - {{ include "kvcluster.tlsDir" . }}/tls.key
    {{- end }}
{{- else }}
grpc:
  port: {{ int $v.router.grpcPort }}
  service: ""
{{- end }}
{{- end }}
