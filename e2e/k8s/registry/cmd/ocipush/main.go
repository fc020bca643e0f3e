// Command ocipush pushes an image tarball (as ocibuild writes it, docker
// "save" format) to a registry under one or more references.
//
// Usage:
//
//	ocipush [--plain-http] [--auth-file FILE] IMAGE.tar HOST:PORT/repo:tag ...
//
// --plain-http talks HTTP instead of HTTPS (the local cluster's registries);
// --auth-file names a file whose first line is "user:password" for basic auth.
// Prints "REF DIGEST" for each reference pushed.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ocipush: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	plain := flag.Bool("plain-http", false, "push over plain HTTP")
	authFile := flag.String("auth-file", "", "file whose first line is user:password")
	flag.Parse()
	if flag.NArg() < 2 {
		flag.Usage()
		os.Exit(2)
	}
	img, err := tarball.ImageFromPath(flag.Arg(0), nil)
	if err != nil {
		fail("read %s: %v", flag.Arg(0), err)
	}
	digest, err := img.Digest()
	if err != nil {
		fail("digest of %s: %v", flag.Arg(0), err)
	}
	var auth authn.Authenticator = authn.Anonymous
	if *authFile != "" {
		b, err := os.ReadFile(*authFile)
		if err != nil {
			fail("%v", err)
		}
		line, _, _ := strings.Cut(string(b), "\n")
		user, pass, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			fail("%s: want user:password on its first line", *authFile)
		}
		auth = &authn.Basic{Username: user, Password: pass}
	}
	opts := []name.Option{name.StrictValidation}
	if *plain {
		opts = append(opts, name.Insecure)
	}
	for _, ref := range flag.Args()[1:] {
		tag, err := name.NewTag(ref, opts...)
		if err != nil {
			fail("bad reference %q: %v", ref, err)
		}
		if err := remote.Write(tag, img, remote.WithAuth(auth)); err != nil {
			fail("push %s: %v", ref, err)
		}
		fmt.Printf("%s %s\n", ref, digest)
	}
}
