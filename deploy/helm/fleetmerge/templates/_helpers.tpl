{{- define "fleetmerge.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetmerge.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fleetmerge.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleetmerge.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fleetmerge.tokenSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{ .Values.auth.existingSecret }}
{{- else -}}
{{ include "fleetmerge.fullname" . }}-token
{{- end -}}
{{- end -}}

{{- define "fleetmerge.tokenKey" -}}
{{- if .Values.auth.existingSecret -}}
{{ .Values.auth.existingSecretKey }}
{{- else -}}
token
{{- end -}}
{{- end -}}

{{- define "fleetmerge.tlsSecret" -}}
{{- if .Values.tls.existingSecret -}}
{{ .Values.tls.existingSecret }}
{{- else -}}
{{ include "fleetmerge.fullname" . }}-tls
{{- end -}}
{{- end -}}

{{/* The host name workers connect to (and the coordinator's certificate names). */}}
{{- define "fleetmerge.coordinatorHost" -}}
{{ include "fleetmerge.fullname" . }}-coordinator
{{- end -}}

{{- define "fleetmerge.configMap" -}}
{{- if .Values.merge.existingConfigMap -}}
{{ .Values.merge.existingConfigMap }}
{{- else -}}
{{ include "fleetmerge.fullname" . }}-config
{{- end -}}
{{- end -}}

{{/* Environment shared by the coordinator and the workers. */}}
{{- define "fleetmerge.env" -}}
- name: RUST_LOG
  value: info
{{- if .Values.storage.gcsServiceAccount.existingSecret }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: /var/run/secrets/fleetmerge/gcs/{{ .Values.storage.gcsServiceAccount.key }}
{{- end }}
{{- if .Values.merge.storageConfig }}
- name: FLEETMERGE_STORAGE_CONFIG
  value: /etc/fleetmerge/storage.yaml
{{- end }}
{{- if .Values.hf.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hf.existingSecret }}
      key: {{ .Values.hf.existingSecretKey }}
{{- end }}
{{- if .Values.hf.endpoint }}
- name: HF_ENDPOINT
  value: {{ .Values.hf.endpoint | quote }}
{{- end }}
{{- end -}}

{{- define "fleetmerge.envFrom" -}}
{{- if .Values.storage.existingSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.storage.existingSecret }}
{{- end }}
{{- end -}}

{{/* Volume mounts shared by the coordinator and the workers. */}}
{{- define "fleetmerge.mounts" -}}
- name: token
  mountPath: /var/run/secrets/fleetmerge/token
  readOnly: true
- name: config
  mountPath: /etc/fleetmerge
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /var/run/secrets/fleetmerge/tls
  readOnly: true
{{- end }}
{{- if .Values.storage.gcsServiceAccount.existingSecret }}
- name: gcs
  mountPath: /var/run/secrets/fleetmerge/gcs
  readOnly: true
{{- end }}
{{- if .Values.persistence.existingClaim }}
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
{{- end }}
{{- end -}}

{{- define "fleetmerge.volumes" -}}
- name: token
  secret:
    secretName: {{ include "fleetmerge.tokenSecret" . }}
    items:
      - key: {{ include "fleetmerge.tokenKey" . }}
        path: token
- name: config
  configMap:
    name: {{ include "fleetmerge.configMap" . }}
- name: tmp
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "fleetmerge.tlsSecret" . }}
{{- end }}
{{- if .Values.storage.gcsServiceAccount.existingSecret }}
- name: gcs
  secret:
    secretName: {{ .Values.storage.gcsServiceAccount.existingSecret }}
{{- end }}
{{- if .Values.persistence.existingClaim }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim }}
{{- end }}
{{- end -}}
