// Command ocibuild builds a single-layer container image tarball (docker
// "save" format, importable with `ctr images import`) from files on the host,
// without a container engine.
//
// Usage:
//
//	ocibuild --image clustered.dev/name:tag --out name.tar \
//	    --entrypoint /bin/x [--entrypoint arg ...] [--cmd arg ...] \
//	    [--user 65532] [--workdir /] [--env K=V ...] [--label K=V ...] \
//	    [--file SRC:DST[:MODE] ...] [--symlink LINK:TARGET ...] \
//	    [--dir DST[:MODE] ...] [--ldd BIN ...]
//
// Every image gets a minimal root filesystem: /etc/passwd and /etc/group with
// root and a "nonroot" user/group 65532, /tmp with mode 1777, and /home/nonroot
// owned by 65532. Files are owned by root unless DST is under /home/nonroot.
// A SRC that is a directory is copied recursively. --ldd BIN adds the dynamic
// loader and every shared library `ldd BIN` lists, at the paths ldd prints
// (symlinks resolved to their content). Timestamps are fixed so the same
// inputs give the same image digest.
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const (
	nonrootID = 65532
	nonroot   = "nonroot"
)

// epoch is the fixed modification time of every entry (reproducible digests).
var epoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

type entry struct {
	typ    byte // tar.TypeReg, tar.TypeDir, tar.TypeSymlink
	mode   int64
	uid    int
	gid    int
	src    string // host file for regular files copied from disk
	data   []byte // inline content for generated files
	target string // symlink target
}

type fsTree map[string]*entry // key: absolute clean path inside the image

func (t fsTree) ensureParents(p string) {
	for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
		if _, ok := t[d]; !ok {
			t[d] = &entry{typ: tar.TypeDir, mode: 0o755}
		}
	}
}

func (t fsTree) put(p string, e *entry) {
	p = path.Clean("/" + p)
	if strings.HasPrefix(p, "/home/"+nonroot) {
		e.uid, e.gid = nonrootID, nonrootID
	}
	t.ensureParents(p)
	t[p] = e
}

func parseMode(s string) (int64, error) {
	m, err := strconv.ParseInt(s, 8, 32)
	if err != nil {
		return 0, fmt.Errorf("bad mode %q: %v", s, err)
	}
	return m, nil
}

// addHostPath copies a host file (following symlinks) or directory tree.
func (t fsTree) addHostPath(src, dst string, mode int64) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		if mode < 0 {
			mode = int64(st.Mode().Perm())
		}
		t.put(dst, &entry{typ: tar.TypeReg, mode: mode, src: src})
		return nil
	}
	return filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		d := path.Join(dst, filepath.ToSlash(rel))
		switch {
		case fi.IsDir():
			t.put(d, &entry{typ: tar.TypeDir, mode: int64(fi.Mode().Perm())})
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			t.put(d, &entry{typ: tar.TypeSymlink, mode: 0o777, target: target})
		case fi.Mode().IsRegular():
			m := int64(fi.Mode().Perm())
			if mode >= 0 {
				m = mode
			}
			t.put(d, &entry{typ: tar.TypeReg, mode: m, src: p})
		}
		return nil
	})
}

// lddPaths returns the absolute paths `ldd bin` reports (loader included).
func lddPaths(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") ||
			strings.Contains(string(out), "statically linked") {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %v: %s", bin, err, out)
	}
	var paths []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("ldd %s: missing library: %s", bin, line)
		}
		var p string
		if i := strings.Index(line, "=>"); i >= 0 {
			p = strings.TrimSpace(line[i+2:])
		} else {
			p = line
		}
		if j := strings.Index(p, " ("); j >= 0 {
			p = p[:j]
		}
		if strings.HasPrefix(p, "/") {
			paths = append(paths, p)
		}
	}
	return paths, sc.Err()
}

func (t fsTree) writeTar(w io.Writer) error {
	tw := tar.NewWriter(w)
	keys := make([]string, 0, len(t))
	for k := range t {
		keys = append(keys, k)
	}
	sort.Strings(keys) // parents sort before their children
	for _, k := range keys {
		e := t[k]
		h := &tar.Header{
			Name:    strings.TrimPrefix(k, "/"),
			Mode:    e.mode,
			Uid:     e.uid,
			Gid:     e.gid,
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		switch e.typ {
		case tar.TypeDir:
			h.Typeflag = tar.TypeDir
			h.Name += "/"
		case tar.TypeSymlink:
			h.Typeflag = tar.TypeSymlink
			h.Linkname = e.target
		case tar.TypeReg:
			h.Typeflag = tar.TypeReg
			if e.src != "" {
				f, err := os.Open(e.src)
				if err != nil {
					return err
				}
				st, err := f.Stat()
				if err != nil {
					f.Close()
					return err
				}
				h.Size = st.Size()
				if err := tw.WriteHeader(h); err != nil {
					f.Close()
					return err
				}
				n, err := io.Copy(tw, f)
				f.Close()
				if err != nil {
					return fmt.Errorf("copy %s: %v", e.src, err)
				}
				if n != h.Size {
					return fmt.Errorf("copy %s: size changed while reading", e.src)
				}
				continue
			}
			h.Size = int64(len(e.data))
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			if _, err := tw.Write(e.data); err != nil {
				return err
			}
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	return tw.Close()
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "ocibuild: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	var (
		image   = flag.String("image", "", "image reference, e.g. clustered.dev/name:tag (required)")
		out     = flag.String("out", "", "output tarball path (required)")
		user    = flag.String("user", strconv.Itoa(nonrootID), "user (uid[:gid]) the image runs as")
		workdir = flag.String("workdir", "/", "working directory")
		entrypt multi
		cmdArgs multi
		envs    multi
		labels  multi
		files   multi
		links   multi
		dirs    multi
		ldds    multi
	)
	flag.Var(&entrypt, "entrypoint", "entrypoint element (repeat for arguments)")
	flag.Var(&cmdArgs, "cmd", "cmd element (repeatable)")
	flag.Var(&envs, "env", "K=V environment variable (repeatable)")
	flag.Var(&labels, "label", "K=V label (repeatable)")
	flag.Var(&files, "file", "SRC:DST[:MODE] host file or directory to copy (repeatable)")
	flag.Var(&links, "symlink", "LINK:TARGET symlink to create (repeatable)")
	flag.Var(&dirs, "dir", "DST[:MODE] empty directory to create (repeatable)")
	flag.Var(&ldds, "ldd", "BIN: add the loader and shared libraries BIN needs (repeatable)")
	flag.Parse()
	if *image == "" || *out == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	tag, err := name.NewTag(*image, name.StrictValidation)
	if err != nil {
		fail("bad --image %q: %v", *image, err)
	}

	t := fsTree{}
	passwd := fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\n%s:x:%d:%d:%s:/home/%s:/sbin/nologin\n",
		nonroot, nonrootID, nonrootID, nonroot, nonroot)
	group := fmt.Sprintf("root:x:0:\n%s:x:%d:\n", nonroot, nonrootID)
	t.put("/etc/passwd", &entry{typ: tar.TypeReg, mode: 0o644, data: []byte(passwd)})
	t.put("/etc/group", &entry{typ: tar.TypeReg, mode: 0o644, data: []byte(group)})
	t.put("/etc/nsswitch.conf", &entry{typ: tar.TypeReg, mode: 0o644, data: []byte("hosts: files dns\n")})
	t.put("/tmp", &entry{typ: tar.TypeDir, mode: 0o1777})
	t.put("/root", &entry{typ: tar.TypeDir, mode: 0o700})
	t.put("/home/"+nonroot, &entry{typ: tar.TypeDir, mode: 0o755})

	for _, d := range dirs {
		p, m := d, int64(0o755)
		if i := strings.LastIndex(d, ":"); i >= 0 {
			if m, err = parseMode(d[i+1:]); err != nil {
				fail("--dir %q: %v", d, err)
			}
			p = d[:i]
		}
		t.put(p, &entry{typ: tar.TypeDir, mode: m})
	}
	for _, f := range files {
		parts := strings.Split(f, ":")
		if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || !strings.HasPrefix(parts[1], "/") {
			fail("--file %q: want SRC:/DST[:MODE]", f)
		}
		mode := int64(-1)
		if len(parts) == 3 {
			if mode, err = parseMode(parts[2]); err != nil {
				fail("--file %q: %v", f, err)
			}
		}
		if err := t.addHostPath(parts[0], parts[1], mode); err != nil {
			fail("--file %q: %v", f, err)
		}
	}
	for _, bin := range ldds {
		paths, err := lddPaths(bin)
		if err != nil {
			fail("--ldd: %v", err)
		}
		for _, p := range paths {
			if err := t.addHostPath(p, p, -1); err != nil {
				fail("--ldd %s: %v", bin, err)
			}
		}
	}
	for _, l := range links {
		i := strings.Index(l, ":")
		if i <= 0 || i == len(l)-1 {
			fail("--symlink %q: want LINK:TARGET", l)
		}
		t.put(l[:i], &entry{typ: tar.TypeSymlink, mode: 0o777, target: l[i+1:]})
	}

	var buf bytes.Buffer
	if err := t.writeTar(&buf); err != nil {
		fail("building layer: %v", err)
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	}, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		fail("layer: %v", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		fail("append layer: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		fail("config: %v", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = "amd64"
	cf.OS = "linux"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = entrypt
	cf.Config.Cmd = cmdArgs
	cf.Config.User = *user
	cf.Config.WorkingDir = *workdir
	hasPath := false
	for _, e := range envs {
		if !strings.Contains(e, "=") {
			fail("--env %q: want K=V", e)
		}
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		envs = append(multi{"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}, envs...)
	}
	cf.Config.Env = envs
	if len(labels) > 0 {
		cf.Config.Labels = map[string]string{}
		for _, l := range labels {
			k, v, ok := strings.Cut(l, "=")
			if !ok {
				fail("--label %q: want K=V", l)
			}
			cf.Config.Labels[k] = v
		}
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		fail("set config: %v", err)
	}
	tmp := *out + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		fail("write %s: %v", *out, err)
	}
	if err := os.Rename(tmp, *out); err != nil {
		fail("%v", err)
	}
	d, _ := img.Digest()
	fmt.Printf("%s %s %s\n", tag.String(), d, *out)
}
