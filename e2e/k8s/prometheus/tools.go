//go:build tools

// Package tools pins Prometheus' server and promtool so `go mod tidy`
// keeps them (e2e/tests/prometheus.rs runs both).
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
