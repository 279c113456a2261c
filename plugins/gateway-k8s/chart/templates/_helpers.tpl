{{/*
Helpers of the gateway-k8s chart: names, labels, the gateway's TOML (rendered from values by a
small TOML writer: helm's toToml writes every number as a float, which the gateway's strict
config refuses for integer keys) and the RBAC rules shared by Roles and ClusterRoles.
*/}}

{{- define "gateway-k8s.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gateway-k8s.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gateway-k8s.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gateway-k8s.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "gateway"). */}}
{{- define "gateway-k8s.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway-k8s.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gateway-k8s.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "gateway-k8s.gatewayServiceAccount" -}}
{{- default (printf "%s-gateway" (include "gateway-k8s.fullname" .)) .Values.serviceAccount.gateway.name -}}
{{- end -}}

{{- define "gateway-k8s.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "gateway-k8s.fullname" .)) .Values.serviceAccount.controller.name -}}
{{- end -}}

{{- define "gateway-k8s.secretName" -}}
{{- default (printf "%s-secrets" (include "gateway-k8s.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "gateway-k8s.configPath" -}}
/etc/gateway-k8s/gateway.toml
{{- end -}}

{{/* Where schedulers reach the API: the gateway Service inside the cluster. */}}
{{- define "gateway-k8s.apiUrl" -}}
{{- printf "http://%s.%s.svc:%v%s/api" (include "gateway-k8s.fullname" .) .Release.Namespace .Values.gateway.service.port (trimSuffix "/" .Values.gateway.prefix) -}}
{{- end -}}

{{/* The gateway's configuration as a map: what the chart sets, then gateway.config over it. */}}
{{- define "gateway-k8s.configMap" -}}
{{- $v := .Values.gateway -}}
{{- $gateway := dict "backend" "kubernetes" "authenticator" $v.auth.name "log_level" $v.logLevel "admin_users" $v.adminUsers "db_url" $v.database.url "api_url" (include "gateway-k8s.apiUrl" .) -}}
{{- $proxy := dict "address" (printf ":%v" $v.port) "prefix" (trimSuffix "/" $v.prefix) -}}
{{- if $v.tcpPort -}}
{{- $_ := set $proxy "tcp_address" (printf ":%v" $v.tcpPort) -}}
{{- end -}}
{{- $auth := dict $v.auth.name (deepCopy $v.auth.config) -}}
{{- /* Clusters go to the release's namespace unless gateway.config says otherwise. */ -}}
{{- $backend := dict "kubernetes" (dict "namespace" .Release.Namespace) -}}
{{- $base := dict "gateway" $gateway "proxy" $proxy "auth" $auth "metrics" (dict "public" $v.metrics.public) "backend" $backend -}}
{{- /* Per-user namespaces: the template, and the namespaces it may give. */ -}}
{{- if .Values.perUserNamespaces.enabled -}}
{{- $_ := set $backend.kubernetes "namespaces" .Values.perUserNamespaces.allowed -}}
{{- $_ := set $base "cluster" (dict "namespace" .Values.perUserNamespaces.template) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $base (deepCopy $v.config)) -}}
{{- end -}}

{{/* A TOML key: bare when it can be, else a quoted string. */}}
{{- define "gateway-k8s.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* A TOML value: strings through JSON escapes (valid TOML basic strings), whole numbers as
integers, arrays and inline tables recursively. */}}
{{- define "gateway-k8s.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if kindIs "float64" $v -}}
{{- if eq $v (floor $v) -}}{{ int64 $v }}{{- else -}}{{ toJson $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) -}}{{ $v }}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{ if $i }}, {{ end }}{{ include "gateway-k8s.toml.value" $e }}{{- end -}}]
{{- else if kindIs "map" $v -}}
{ {{- range $i, $k := keys $v | sortAlpha -}}{{ if $i }},{{ end }} {{ include "gateway-k8s.toml.key" $k }} = {{ include "gateway-k8s.toml.value" (get $v $k) }}{{- end }} }
{{- else -}}
{{- fail (printf "gateway.config: cannot write %v (a %s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* A TOML table: call with (dict "path" (list ...) "table" map). Plain keys first, then each
sub-table under its own [a.b] header. Null values are left out (TOML has none). */}}
{{- define "gateway-k8s.toml.table" -}}
{{- $table := .table -}}
{{- $path := .path -}}
{{- range $k := keys $table | sortAlpha -}}
{{- $v := get $table $k -}}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ include "gateway-k8s.toml.key" $k }} = {{ include "gateway-k8s.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $table | sortAlpha -}}
{{- $v := get $table $k -}}
{{- if kindIs "map" $v -}}
{{- $sub := append $path $k -}}
{{- $plain := false -}}
{{- range $sv := values $v -}}
{{- if not (or (kindIs "map" $sv) (kindIs "invalid" $sv)) -}}{{- $plain = true -}}{{- end -}}
{{- end -}}
{{- /* A table holding only sub-tables needs no header of its own. */ -}}
{{- if or $plain (not $v) }}

[{{ range $i, $p := $sub }}{{ if $i }}.{{ end }}{{ include "gateway-k8s.toml.key" $p }}{{ end }}]
{{- end -}}
{{- include "gateway-k8s.toml.table" (dict "path" $sub "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gateway-k8s.toml" -}}
# gateway.toml rendered by the gateway-k8s chart from its values (docs/configuration.md).
# Secrets come from the environment: GATEWAY_PROXY_TOKEN, GATEWAY_ENCRYPT_KEYS,
# GATEWAY_METRICS_TOKEN (the chart's Secret).
{{- include "gateway-k8s.toml.table" (dict "path" (list) "table" (include "gateway-k8s.configMap" . | fromYaml)) }}
{{ end -}}

{{/*
RBAC rules: exactly what the code uses, as listed (with the same reasons) in
src/gateway_k8s/rbac.py; tests/test_chart.py checks the rendered Roles grant exactly those
rules, and the end-to-end tests run the fake API server with the rendered Roles.
*/}}

{{- define "gateway-k8s.controllerRules" -}}
- apiGroups: [daskgateway.dev]
  resources: [daskclusters]
  # list/watch: the controller's informer on DaskClusters (list, then watch from the list's
  #   resourceVersion; relist on 410). It never writes a DaskCluster's spec or metadata.
  verbs: [list, watch]
- apiGroups: [daskgateway.dev]
  resources: [daskclusters/status]
  # patch: the observed state (phase, reason, addresses, per-group counts), a merge patch of
  #   the status subresource.
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  # list/watch: the pod informer (scheduler and worker pods, by label).
  # create: the scheduler pod and worker pods of each cluster.
  # delete: worker pods after the scheduler retired them, and pods of a stopped cluster.
  verbs: [list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  # list/watch: the Service informer (one scheduler Service per cluster).
  # create: the scheduler's Service (the proxy routes to it). Deleting goes through the
  #   ownerReference to the DaskCluster.
  verbs: [list, watch, create]
- apiGroups: [""]
  resources: [secrets]
  # list/watch: the informer on the clusters' credentials Secrets (by label).
  # create: one credentials Secret per cluster (TLS key and certificate, API token).
  # get: a credentials Secret that already existed (409 on create) is read back by name.
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [events]
  # list: kubelet events of a scheduler pod stuck before its container runs (image pull
  #   errors, scheduling failures) become the cluster's reason.
  verbs: [list]
{{- with .Values.rbac.controllerExtraRules }}
# Added by the values (rbac.controllerExtraRules).
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "gateway-k8s.leaseRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  # get: read the leader election Lease (holder, renew time).
  # create: make the Lease the first time a controller starts.
  # update: renew it as leader, or take it over once it expired (a resourceVersion-checked
  #   replace, so two standbys cannot both win).
  verbs: [get, create, update]
{{- end -}}

{{- define "gateway-k8s.gatewayRules" -}}
- apiGroups: [daskgateway.dev]
  resources: [daskclusters]
  # list/watch: the clusters are the gateway's state (a restarted or second replica reads
  #   them back; the watch keeps the API and the proxy's routes current).
  # create: a user's new cluster.
  # patch: the scheduler's target in spec.worker.replicas (scale, adapt, worker groups) and
  #   sharing in an annotation (merge patch).
  # delete: a user stops a cluster (ownerReferences remove its pods, Service and Secret).
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  # get: a cluster's credentials Secret, by name and once, for its TLS files and token (given
  #   to the client, checked on the scheduler's heartbeat). No list or watch: the other
  #   Secrets of the namespace stay unread.
  verbs: [get]
- apiGroups: [""]
  resources: [pods/log]
  # get: the logs route (API and web UI): the end of a cluster's scheduler and worker
  #   containers' output, by pod name. No get, list or watch of pods themselves.
  verbs: [get]
{{- with .Values.rbac.gatewayExtraRules }}
# Added by the values (rbac.gatewayExtraRules).
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* "true" when the gateway's and the controller's rules are ClusterRoles: rbac.clusterWide,
or per-user namespaces (their informers list and watch all namespaces). */}}
{{- define "gateway-k8s.clusterWide" -}}
{{- if or .Values.rbac.clusterWide .Values.perUserNamespaces.enabled -}}true{{- end -}}
{{- end -}}

{{/* The namespaces that get namespaced Roles: the release's, then rbac.namespaces. */}}
{{- define "gateway-k8s.roleNamespaces" -}}
{{- toJson (uniq (prepend .Values.rbac.namespaces .Release.Namespace)) -}}
{{- end -}}
