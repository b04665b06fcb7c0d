#!/bin/sh
# The template step of the official nginx image's entrypoint (20-envsubst-on-templates.sh):
# every $NGINX_ENVSUBST_TEMPLATE_DIR/*$NGINX_ENVSUBST_TEMPLATE_SUFFIX becomes
# $NGINX_ENVSUBST_OUTPUT_DIR/<name without the suffix>, substituting only the environment
# variables that are defined (so nginx's own $variables stay as they are).
set -eu
if [ "${1:-}" = nginx ] || [ "${1:-}" = nginx-debug ]; then
  template_dir=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
  suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
  output_dir=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
  filter=${NGINX_ENVSUBST_FILTER:-}
  defined_envs=$(printf '${%s} ' $(awk "END { for (name in ENVIRON) { print ( name ~ /${filter}/ ) ? name : \"\" } }" < /dev/null))
  for template in "$template_dir"/*"$suffix"; do
    [ -f "$template" ] || continue
    relative=${template#"$template_dir/"}
    output="$output_dir/${relative%"$suffix"}"
    mkdir -p "$(dirname "$output")"
    echo "$0: rendering $template to $output"
    envsubst "$defined_envs" < "$template" > "$output"
  done
fi
exec "$@"
