{{/* ------------------------------------------------------------ config volumes */}}

{{/* Volumes for pods that render the cluster file: ConfigMap, Secret, TLS, a run dir. */}}
{{- define "kvcluster.configVolumes" -}}
- name: config
  configMap:
    name: {{ include "kvcluster.configName" . }}
- name: secret
  secret:
    secretName: {{ include "kvcluster.secretName" . }}
    defaultMode: 0400
    items:
      - {key: security.yaml, path: security.yaml}
- name: run
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- include "kvcluster.tlsVolume" . }}
{{- end }}

{{- define "kvcluster.configMounts" -}}
- {name: config, mountPath: {{ include "kvcluster.configDir" . }}, readOnly: true}
- {name: secret, mountPath: {{ include "kvcluster.secretDir" . }}, readOnly: true}
- {name: run, mountPath: {{ include "kvcluster.runDir" . }}}
{{- include "kvcluster.tlsMount" . }}
{{- end }}

{{- define "kvcluster.tlsVolume" -}}
{{- if .Values.security.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "kvcluster.tlsSecretName" . }}
    defaultMode: 0400
{{- end }}
{{- end }}

{{- define "kvcluster.tlsMount" -}}
{{- if .Values.security.tls.enabled }}
- {name: tls, mountPath: {{ include "kvcluster.tlsDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------ Ray worker group */}}

{{/*
One GPU worker group: include "kvcluster.workerGroup" (list $root "prefill" .Values.ray.prefill)
Volumes: /dev/shm as a memory emptyDir (host tier + Ray object store), the disk
tier (node-local emptyDir or a per-pod ephemeral PVC), the internal token (and the
internal TLS certificate) the workers authenticate each other with. Not the front
end's TLS key or the tenants' tokens: workers never serve tenants.
*/}}
{{- define "kvcluster.workerGroup" -}}
{{- $root := index . 0 }}
{{- $pool := index . 1 }}
{{- $g := index . 2 }}
{{- $v := $root.Values }}
{{- $disk := $v.store.disk }}
- groupName: {{ $pool }}
  replicas: {{ int $g.replicas }}
  minReplicas: {{ int $g.minReplicas }}
  maxReplicas: {{ int $g.maxReplicas }}
  rayStartParams:
    {{- with $g.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    resources: {{ printf "\"{\\\"%s_pool\\\": 1}\"" $pool | quote }}
  template:
    metadata:
      labels:
        {{- include "kvcluster.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $pool }}
    spec:
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "kvcluster.image" (list $root "cuda") }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          env:
            - {name: KVCLUSTER_POOL, value: {{ $pool }}}
          ports:
            - {name: kv-transfer, containerPort: {{ int $v.transfer.port }}, protocol: TCP}
          resources:
            requests:
              {{- with $g.resources.requests }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: {{ int $g.gpus }}
            limits:
              {{- with $g.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: {{ int $g.gpus }}
          securityContext:
            {{- include "kvcluster.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - {name: dshm, mountPath: /dev/shm}
            {{- if $disk.enabled }}
            - {name: kv-disk, mountPath: {{ include "kvcluster.diskDir" $root }}}
            {{- end }}
            - {name: internal, mountPath: {{ include "kvcluster.internalDir" $root }}, readOnly: true}
            {{- if $v.security.internal.tls.enabled }}
            - {name: internal-tls, mountPath: {{ include "kvcluster.internalTlsDir" $root }}, readOnly: true}
            {{- end }}
      volumes:
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ printf "%dGi" (add (int $v.store.host.capacityGiB) (int $v.store.host.shmExtraGiB)) }}
        {{- if $disk.enabled }}
        - name: kv-disk
          {{- $size := printf "%dGi" (add (int $disk.capacityGiB) (int $disk.extraGiB)) }}
          {{- if eq $disk.volume.type "ephemeral" }}
          ephemeral:
            volumeClaimTemplate:
              metadata:
                labels:
                  {{- include "kvcluster.selectorLabels" $root | nindent 18 }}
                  app.kubernetes.io/component: {{ $pool }}-kv-disk
              spec:
                accessModes: ["ReadWriteOnce"]
                {{- with $disk.volume.storageClassName }}
                storageClassName: {{ . }}
                {{- end }}
                resources:
                  requests:
                    storage: {{ $size }}
          {{- else }}
          emptyDir:
            sizeLimit: {{ $size }}
          {{- end }}
        {{- end }}
        - name: internal
          secret:
            secretName: {{ include "kvcluster.internalSecretName" $root }}
            defaultMode: 0400
            items:
              - {key: {{ include "kvcluster.internalSecretKey" $root }}, path: token}
        {{- if $v.security.internal.tls.enabled }}
        - name: internal-tls
          secret:
            secretName: {{ $v.security.internal.tls.existingSecret }}
            defaultMode: 0400
        {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
