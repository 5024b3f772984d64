{{/* ---------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------- */}}

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name: `herald` for a release called herald, else <release>-herald. */}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The services the chart deploys, in a fixed order. */}}
{{- define "herald.components" -}}
ingress token renderer sender callback
{{- end -}}

{{/* Services with an HTTP API of their own (besides the admin port). */}}
{{- define "herald.httpComponents" -}}
ingress token callback
{{- end -}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of every object; with a component, its selector labels too. */}}
{{- define "herald.labels" -}}
{{- $root := .root | default . -}}
helm.sh/chart: {{ include "herald.chart" $root }}
app.kubernetes.io/name: {{ include "herald.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: herald
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "herald.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The in-cluster address of a component's Service. */}}
{{- define "herald.serviceHost" -}}
{{- printf "%s-%s.%s.svc" (include "herald.fullname" .root) .component .root.Release.Namespace -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Secrets: which Secret and key holds each credential
--------------------------------------------------------------------------------------- */}}

{{- define "herald.credentialsSecretName" -}}
{{- printf "%s-credentials" (include "herald.fullname" .) -}}
{{- end -}}

{{/* The Secret of one concern (amqp, postgres, redis, tokenService). */}}
{{- define "herald.secretName" -}}
{{- $s := index .root.Values.secrets .concern -}}
{{- default (include "herald.credentialsSecretName" .root) $s.existingSecret -}}
{{- end -}}

{{/* True when the chart creates the credentials Secret for at least one concern. */}}
{{- define "herald.managesCredentials" -}}
{{- $v := .Values.secrets -}}
{{- if or (not $v.amqp.existingSecret) (not $v.postgres.existingSecret) (not $v.redis.existingSecret) (not $v.tokenService.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{- define "herald.providerSecretName" -}}
{{- default (printf "%s-provider-accounts" (include "herald.fullname" .)) .Values.secrets.providerAccounts.existingSecret -}}
{{- end -}}

{{- define "herald.callbackSecretName" -}}
{{- default (printf "%s-callback" (include "herald.fullname" .)) .Values.secrets.callback.existingSecret -}}
{{- end -}}

{{/* The key holding a provider account's app secret. */}}
{{- define "herald.providerSecretKey" -}}
{{- default .id .account.secretKey -}}
{{- end -}}

{{- define "herald.callbackTokenKey" -}}
{{- default (printf "%s.token" .id) .account.tokenKey -}}
{{- end -}}

{{- define "herald.callbackAesKeyKey" -}}
{{- default (printf "%s.encodingAESKey" .id) .account.encodingAESKeyKey -}}
{{- end -}}

{{- define "herald.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.secretName" (dict "root" .root "concern" .concern) }}
      key: {{ (index .root.Values.secrets .concern).key }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
herald.toml
--------------------------------------------------------------------------------------- */}}

{{/* Fails on settings that belong elsewhere; run by every template that renders config. */}}
{{- define "herald.validate" -}}
{{- $extra := .Values.extraConfig -}}
{{- range $section, $key := dict "amqp" "url" "postgres" "url" "token_service" "auth_token" -}}
{{- if hasKey (get $extra $section | default dict) $key -}}
{{- fail (printf "extraConfig.%s.%s: credentials come from `secrets`, not from herald.toml (it is a ConfigMap)" $section $key) -}}
{{- end -}}
{{- end -}}
{{- $token := get $extra "token" | default dict -}}
{{- if or (hasKey $token "auth_token") (hasKey (get $token "redis" | default dict) "url") (hasKey $token "accounts") -}}
{{- fail "extraConfig.token: auth_token, redis.url and accounts are set from `secrets` and `providerAccounts`" -}}
{{- end -}}
{{- $cb := get $extra "callback" | default dict -}}
{{- if or (hasKey $cb "wechat") (hasKey $cb "wecom") -}}
{{- fail "extraConfig.callback.wechat/wecom: use `callbackAccounts` (their tokens come from secrets.callback)" -}}
{{- end -}}
{{- if hasKey (get (get $extra "sender" | default dict) "redis" | default dict) "url" -}}
{{- fail "extraConfig.sender.redis.url: the Redis URL comes from secrets.redis" -}}
{{- end -}}
{{- range $id, $a := .Values.callbackAccounts -}}
{{- if and (eq ($a.provider | default "wechat") "wecom") (not $a.corpid) -}}
{{- fail (printf "callbackAccounts.%s: a WeCom account needs corpid" $id) -}}
{{- end -}}
{{- if and (ne ($a.provider | default "wechat") "wecom") (not $a.appid) -}}
{{- fail (printf "callbackAccounts.%s: a WeChat account needs appid" $id) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sender.keda.enabled .Values.sender.autoscaling.enabled -}}
{{- fail "sender: keda.enabled and autoscaling.enabled are exclusive (KEDA creates the sender's HPA)" -}}
{{- end -}}
{{- range $c := splitList " " (include "herald.components" .) -}}
{{- $v := index $.Values $c -}}
{{- if and $v.enabled $v.autoscaling.enabled (not (or $v.autoscaling.targetCPUUtilizationPercentage $v.autoscaling.targetMemoryUtilizationPercentage)) -}}
{{- fail (printf "%s.autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" $c) -}}
{{- end -}}
{{- end -}}
{{- range $concern := list "amqp" "postgres" "redis" -}}
{{- $s := index $.Values.secrets $concern -}}
{{- if and (not $s.existingSecret) (not $s.value) -}}
{{- fail (printf "secrets.%s: set existingSecret (and key) or value" $concern) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.secrets.providerAccounts.existingSecret -}}
{{- range $id, $account := .Values.providerAccounts -}}
{{- $key := include "herald.providerSecretKey" (dict "id" $id "account" $account) -}}
{{- if not (hasKey $.Values.secrets.providerAccounts.values $key) -}}
{{- fail (printf "providerAccounts.%s: its app secret is missing: set secrets.providerAccounts.values.%s or secrets.providerAccounts.existingSecret" $id $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not .Values.secrets.callback.existingSecret -}}
{{- range $id, $account := .Values.callbackAccounts -}}
{{- $key := include "herald.callbackTokenKey" (dict "id" $id "account" $account) -}}
{{- if not (hasKey $.Values.secrets.callback.values $key) -}}
{{- fail (printf "callbackAccounts.%s: its callback Token is missing: set secrets.callback.values.%s or secrets.callback.existingSecret" $id (quote $key)) -}}
{{- end -}}
{{- $aes := include "herald.callbackAesKeyKey" (dict "id" $id "account" $account) -}}
{{- if and (eq ($account.provider | default "wechat") "wecom") (not (hasKey $.Values.secrets.callback.values $aes)) -}}
{{- fail (printf "callbackAccounts.%s: a WeCom account needs its EncodingAESKey: set secrets.callback.values.%s" $id (quote $aes)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The whole configuration as YAML: `config`, then `extraConfig`, then the chart's own keys. */}}
{{- define "herald.configData" -}}
{{- $cfg := mergeOverwrite (deepCopy .Values.config) (deepCopy .Values.extraConfig) -}}
{{- $telemetry := get $cfg "telemetry" | default dict -}}
{{- $_ := set $telemetry "admin_listen" (printf "0.0.0.0:%d" (int .Values.adminPort)) -}}
{{- $_ = set $cfg "telemetry" $telemetry -}}
{{- $ingress := get $cfg "ingress" | default dict -}}
{{- $_ = set $ingress "listen" (printf "0.0.0.0:%d" (int .Values.ingress.port)) -}}
{{- $_ = set $cfg "ingress" $ingress -}}
{{- $token := get $cfg "token" | default dict -}}
{{- $_ = set $token "listen" (printf "0.0.0.0:%d" (int .Values.token.port)) -}}
{{- $accounts := dict -}}
{{- range $id, $a := .Values.providerAccounts -}}
{{- $account := dict "kind" ($a.kind | default "wechat_official_account") "appid" $a.appid "secret_file" (printf "/var/run/secrets/herald/accounts/%s" $id) -}}
{{- with $a.baseUrl }}{{ $_ := set $account "base_url" . }}{{ end -}}
{{- with $a.tokenEndpoint }}{{ $_ := set $account "token_endpoint" . }}{{ end -}}
{{- with $a.agentId }}{{ $_ := set $account "agent_id" (toString .) }}{{ end -}}
{{- $_ := set $accounts $id $account -}}
{{- end -}}
{{- if $accounts }}{{ $_ = set $token "accounts" $accounts }}{{ end -}}
{{- $_ = set $cfg "token" $token -}}
{{- $_ = set $cfg "token_service" (dict "url" (printf "http://%s:%d" (include "herald.serviceHost" (dict "root" . "component" "token")) (int .Values.token.port))) -}}
{{- $callback := get $cfg "callback" | default dict -}}
{{- $_ = set $callback "listen" (printf "0.0.0.0:%d" (int .Values.callback.port)) -}}
{{- $byProvider := dict "wechat" dict "wecom" dict -}}
{{- range $id, $a := .Values.callbackAccounts -}}
{{- if eq ($a.provider | default "wechat") "wecom" -}}
{{- $_ := set $byProvider.wecom $id (dict "corpid" $a.corpid) -}}
{{- else -}}
{{- $_ := set $byProvider.wechat $id (dict "appid" $a.appid) -}}
{{- end -}}
{{- end -}}
{{- range $provider, $accounts := $byProvider -}}
{{- if $accounts }}{{ $_ := set $callback $provider $accounts }}{{ end -}}
{{- end -}}
{{- $_ = set $cfg "callback" $callback -}}
{{- $sender := get $cfg "sender" | default dict -}}
{{- if not (hasKey $sender "replicas") -}}
{{- /* The local fallback rate limiter (Redis away) allows limit / replicas per sender: with
       autoscaling, the most replicas there can be, so that together they stay under it. */ -}}
{{- $replicas := .Values.sender.replicas -}}
{{- if .Values.sender.keda.enabled }}{{ $replicas = .Values.sender.keda.maxReplicaCount }}
{{- else if .Values.sender.autoscaling.enabled }}{{ $replicas = .Values.sender.autoscaling.maxReplicas }}{{ end -}}
{{- $_ = set $sender "replicas" (max 1 (int $replicas)) -}}
{{- end -}}
{{- $_ = set $cfg "sender" $sender -}}
{{- if .Values.sandbox.enabled -}}
{{- $sandbox := get $cfg "sandbox" | default dict -}}
{{- $_ = set $sandbox "listen" (printf "0.0.0.0:%d" (int .Values.sandbox.port)) -}}
{{- $_ = set $cfg "sandbox" $sandbox -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* What the migration hook needs: [amqp], [postgres] and [telemetry] (no admin listener). */}}
{{- define "herald.migrateConfigData" -}}
{{- $all := fromYaml (include "herald.configData" .) -}}
{{- $telemetry := omit (get $all "telemetry" | default dict) "admin_listen" -}}
{{- toYaml (dict "amqp" (get $all "amqp") "postgres" (get $all "postgres") "telemetry" $telemetry) -}}
{{- end -}}

{{/* TOML from a YAML map: scalars and arrays, tables, arrays of tables. Numbers arrive from
     values as floats; whole ones are written as integers. null leaves a key out. */}}
{{- define "herald.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "herald.toml.value" -}}
{{- $v := . -}}
{{- $k := kindOf $v -}}
{{- if eq $k "string" -}}{{ toJson $v }}
{{- else if eq $k "bool" -}}{{ ternary "true" "false" $v }}
{{- else if or (eq $k "float64") (eq $k "float32") -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if hasPrefix "int" $k -}}{{ $v }}
{{- else if hasPrefix "uint" $k -}}{{ $v }}
{{- else if eq $k "slice" -}}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "herald.toml.value" $e }}{{ end }}]
{{- else if eq $k "map" -}}{ {{- range $i, $key := keys $v | sortAlpha }}{{ if $i }}, {{ else }} {{ end }}{{ include "herald.toml.key" $key }} = {{ include "herald.toml.value" (get $v $key) }}{{ end }} }
{{- else -}}{{ fail (printf "herald.toml: cannot write a %s" $k) }}
{{- end -}}
{{- end -}}

{{/* "true" when v is a non-empty list of maps (an array of tables). */}}
{{- define "herald.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}
{{- $all := true -}}
{{- range . }}{{ if not (kindIs "map" .) }}{{ $all = false }}{{ end }}{{ end -}}
{{- if $all }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* The body of the table at .path: its plain keys, then its tables and arrays of tables. */}}
{{- define "herald.toml.body" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- range $key := keys $table | sortAlpha }}
{{- $v := get $table $key }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "herald.toml.isTableArray" $v)) }}
{{ include "herald.toml.key" $key }} = {{ include "herald.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $v := get $table $key }}
{{- $sub := include "herald.toml.key" $key }}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- if kindIs "map" $v }}

[{{ $sub }}]
{{- include "herald.toml.body" (dict "path" $sub "table" $v) }}
{{- else if include "herald.toml.isTableArray" $v }}
{{- range $e := $v }}

[[{{ $sub }}]]
{{- include "herald.toml.body" (dict "path" $sub "table" $e) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "herald.toml" -}}
# herald.toml, generated by the Herald Helm chart from its values (config, extraConfig,
# providerAccounts, callbackAccounts). Credentials are not here: they arrive as HERALD_*
# environment variables and mounted files from Secrets.
{{- include "herald.toml.body" (dict "path" "" "table" (fromYaml .)) }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Pods
--------------------------------------------------------------------------------------- */}}

{{/* Environment shared by every Herald container of a component. */}}
{{- define "herald.commonEnv" -}}
- name: HERALD_CONFIG
  value: /etc/herald/herald.toml
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),service.version=%s%s" .root.Chart.AppVersion (ternary (printf ",%s" .root.Values.tracing.resourceAttributes) "" (ne .root.Values.tracing.resourceAttributes "")) | quote }}
{{- with .root.Values.tracing }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
{{- end }}
{{- if .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- end }}
{{- if .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The credentials a component needs, as environment variables. */}}
{{- define "herald.credentialEnv" -}}
{{- $root := .root -}}
{{- $c := .component -}}
{{- if has $c (list "ingress" "renderer" "sender" "callback") }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "amqp" "name" "HERALD_AMQP__URL") }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "postgres" "name" "HERALD_POSTGRES__URL") }}
{{- end }}
{{- if eq $c "token" }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "redis" "name" "HERALD_TOKEN__REDIS__URL") }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "tokenService" "name" "HERALD_TOKEN__AUTH_TOKEN") }}
{{- if eq (get (get $root.Values.config "telemetry" | default dict) "log_format") "json" }}
- name: HERALD_LOG_FORMAT
  value: json
{{- end }}
{{- end }}
{{- if eq $c "sender" }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "redis" "name" "HERALD_SENDER__REDIS__URL") }}
{{ include "herald.secretEnv" (dict "root" $root "concern" "tokenService" "name" "HERALD_TOKEN_SERVICE__AUTH_TOKEN") }}
{{- end }}
{{- if eq $c "callback" }}
{{- range $id, $account := $root.Values.callbackAccounts }}
{{- $provider := $account.provider | default "wechat" }}
{{- $env := printf "HERALD_CALLBACK__%s__%s" (upper $provider) (upper $id) }}
- name: {{ $env }}__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.callbackSecretName" $root }}
      key: {{ include "herald.callbackTokenKey" (dict "id" $id "account" $account) }}
- name: {{ $env }}__ENCODING_AES_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.callbackSecretName" $root }}
      key: {{ include "herald.callbackAesKeyKey" (dict "id" $id "account" $account) }}
      {{- if eq $provider "wechat" }}
      {{- /* WeChat's plain mode has no EncodingAESKey; WeCom always does. */}}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Checksums that roll the pods when their configuration or chart-managed secrets change. */}}
{{- define "herald.checksums" -}}
checksum/config: {{ include "herald.configData" .root | sha256sum }}
{{- if include "herald.managesCredentials" .root }}
checksum/credentials: {{ toJson (list .root.Values.secrets.amqp .root.Values.secrets.postgres .root.Values.secrets.redis .root.Values.secrets.tokenService) | sha256sum }}
{{- end }}
{{- if and (eq .component "token") .root.Values.providerAccounts (not .root.Values.secrets.providerAccounts.existingSecret) }}
checksum/provider-accounts: {{ toJson .root.Values.secrets.providerAccounts.values | sha256sum }}
{{- end }}
{{- if and (eq .component "callback") .root.Values.callbackAccounts (not .root.Values.secrets.callback.existingSecret) }}
checksum/callback: {{ toJson .root.Values.secrets.callback.values | sha256sum }}
{{- end }}
{{- end -}}
