//go:build tools

// Package tools pins the CNCF distribution registry command so `go mod tidy`
// keeps it.
package tools

import (
	_ "github.com/distribution/distribution/v3/cmd/registry"
	// ocipush (cmd/ocipush) pushes ocibuild's tarballs; pinned at the
	// parent module's version.
	_ "github.com/google/go-containerregistry/pkg/v1/remote"
)
