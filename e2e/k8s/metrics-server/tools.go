//go:build tools

// Package tools pins the metrics-server command so `go mod tidy` keeps it.
package tools

import _ "sigs.k8s.io/metrics-server/cmd/metrics-server"
