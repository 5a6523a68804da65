{{/* Names and labels. */}}
{{- define "spa-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spa-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "spa-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "spa-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "spa-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spa-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "spa-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "spa-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spa-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "spa-operator.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) -}}
{{- end -}}

{{/* Namespaces that get a worker ServiceAccount: the watched ones; cluster-wide, worker.serviceAccount.namespaces
(default: the release's). */}}
{{- define "spa-operator.workerNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else if .Values.worker.serviceAccount.namespaces -}}
{{- join "," .Values.worker.serviceAccount.namespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The operator gives worker pods this account only where the chart creates it in every namespace runs may use:
watched namespaces, or an explicit worker.serviceAccount.namespaces list. Otherwise pods use their namespace's
default account unless a run names one (a missing account would block the pods). */}}
{{- define "spa-operator.workerServiceAccountDefault" -}}
{{- if and .Values.worker.serviceAccount.name (or .Values.watchNamespaces .Values.worker.serviceAccount.namespaces) -}}
{{- .Values.worker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The monitoring.coreos.com CRDs (Prometheus Operator) are installed. */}}
{{- define "spa-operator.hasMonitoring" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* The operator's namespaced rights (least privilege: no wildcards, and no verb the operator does not use:
tests/operator/test_rbac.py compares them with the requests it makes). Secrets are apart: spa-operator.secretRules. */}}
{{- define "spa-operator.rules" }}
# AlignmentRuns: kopf lists and watches them and patches its finalizer and annotations.
- apiGroups: ["spa.dev"]
  resources: ["alignmentruns"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["spa.dev"]
  resources: ["alignmentruns/status"]
  verbs: ["patch"]
# Jobs carry an ownerReference with blockOwnerDeletion to their run: clusters enforcing
# OwnerReferencesPermissionEnforcement (OpenShift) require update on the owner's finalizers for that.
- apiGroups: ["spa.dev"]
  resources: ["alignmentruns/finalizers"]
  verbs: ["update"]
# One Job per stage attempt (get: whose is the Job of that name, when creating it answers 409); patched only to
# suspend or resume; deleted (with its pods) when a pending attempt times out or its run fails.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Stage pods: why one waits (image pull, scheduling), and orphans of a Job deleted without propagation, deleted
# before the next attempt writes to the same place.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
# The headless Service of a multi-node stage (stable pod DNS names for the rendezvous); owned by its Job, so it goes
# with the Job (get: whose is the Service of that name, when creating it answers 409).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# An Event for each transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kueue Workloads of a run's Jobs (runs with queueName): spec.suspend deactivates them (Kueue then evicts the Job)
# and resume reactivates them. Without Kueue installed these rights are unused.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- with .Values.worker.gangScheduling.kind }}
# The pod group of a multi-node stage (worker.gangScheduling), owned by its Job.
- apiGroups: [{{ eq . "volcano" | ternary "scheduling.volcano.sh" "scheduling.x-k8s.io" | quote }}]
  resources: ["podgroups"]
  verbs: ["get", "create"]
{{- end }}
{{- end }}

{{/* Reading the Secrets runs reference (S3 credentials, to read stage manifests; never written anywhere): only
these names when worker.allowedSecrets is set. */}}
{{- define "spa-operator.secretRules" }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.worker.allowedSecrets }}
  resourceNames: {{ concat . (compact (list $.Values.storage.secretName)) | uniq | toJson }}
  {{- end }}
{{- end }}

{{/* Cluster-wide: the namespaces where the operator may read Secrets. */}}
{{- define "spa-operator.secretNamespaces" -}}
{{- concat .Values.rbac.secretNamespaces .Values.worker.serviceAccount.namespaces | uniq | join "," -}}
{{- end -}}
