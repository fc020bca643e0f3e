{{- define "clustered.name" -}}clustered-operator{{- end -}}

{{- define "clustered.labels" -}}
app.kubernetes.io/name: {{ include "clustered.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "clustered.selector" -}}
app.kubernetes.io/name: {{ include "clustered.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
