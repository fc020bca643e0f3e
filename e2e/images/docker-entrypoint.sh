#!/bin/sh
# The entrypoint of the e2e image clustered/demo-app-entrypoint: a shell
# script as many real images have one. It marks that it ran, then runs the
# CMD (or the container's args) in its place.
set -e
export ENTRYPOINT_RAN=docker-entrypoint.sh
exec "$@"
