// Package image checks that the project's image built without a container engine
// (hack/tools-image.sh, `make image`: mmdebstrap → umoci → skopeo) holds what the
// Dockerfile's runtime stage would: it parses the Dockerfile, reads an OCI image
// layout (config and the merged layers), and compares the two. The same check runs
// on an image that buildah builds from the unmodified Dockerfile (opt-in, see
// docs/architecture.md), so both roads are held to one description.
//
// The parser understands the subset of the Dockerfile syntax the repository uses
// (line continuations, comments, ARG defaults before the first FROM, JSON-form
// ENTRYPOINT, quoted LABEL pairs, COPY --from) and the shell of its RUN lines only
// as far as the commands it looks for: apt-get install, groupadd, useradd, ln -s
// and the build loop's go build. Anything it cannot interpret in the runtime stage
// is an error, so a new kind of instruction cannot pass unchecked.
package image

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Instruction is one Dockerfile instruction, continuation lines joined.
type Instruction struct {
	Cmd  string // upper case: FROM, RUN, COPY, …
	Args string // the rest of the line, continuations joined with a space
	Line int    // first line, 1-based
}

// Stage is one FROM and the instructions after it.
type Stage struct {
	From     string // the base image with ARG defaults substituted
	Platform string // --platform=…, unsubstituted
	Name     string // AS name
	Body     []Instruction
}

// Dockerfile is a parsed Dockerfile.
type Dockerfile struct {
	Args   map[string]string // ARG defaults declared before the first FROM
	Stages []Stage
}

// ParseDockerfile reads the instructions of a Dockerfile.
func ParseDockerfile(r io.Reader) (*Dockerfile, error) {
	var instrs []Instruction
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var cur strings.Builder
	start, n := 0, 0
	for sc.Scan() {
		n++
		line := sc.Text()
		trim := strings.TrimSpace(line)
		if trim == "" || strings.HasPrefix(trim, "#") {
			continue // comments and blank lines, also inside a continuation
		}
		if cur.Len() == 0 {
			start = n
		} else {
			cur.WriteByte(' ')
		}
		if strings.HasSuffix(trim, `\`) {
			cur.WriteString(strings.TrimSpace(strings.TrimSuffix(trim, `\`)))
			continue
		}
		cur.WriteString(trim)
		instrs = append(instrs, split(cur.String(), start))
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if cur.Len() > 0 {
		return nil, fmt.Errorf("line %d: continuation at the end of the file", start)
	}
	df := &Dockerfile{Args: map[string]string{}}
	for _, in := range instrs {
		switch {
		case in.Cmd == "FROM":
			st, err := parseFrom(in, df.Args)
			if err != nil {
				return nil, err
			}
			df.Stages = append(df.Stages, st)
		case len(df.Stages) == 0 && in.Cmd == "ARG":
			k, v, _ := strings.Cut(in.Args, "=")
			df.Args[strings.TrimSpace(k)] = unquote(strings.TrimSpace(v))
		case len(df.Stages) == 0:
			return nil, fmt.Errorf("line %d: %s before the first FROM", in.Line, in.Cmd)
		default:
			df.Stages[len(df.Stages)-1].Body = append(df.Stages[len(df.Stages)-1].Body, in)
		}
	}
	if len(df.Stages) == 0 {
		return nil, fmt.Errorf("no FROM")
	}
	return df, nil
}

// ParseDockerfileFile parses the Dockerfile at path.
func ParseDockerfileFile(path string) (*Dockerfile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	df, err := ParseDockerfile(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return df, nil
}

func split(s string, line int) Instruction {
	cmd, args, _ := strings.Cut(s, " ")
	return Instruction{Cmd: strings.ToUpper(cmd), Args: strings.TrimSpace(args), Line: line}
}

var argRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)`)

func parseFrom(in Instruction, args map[string]string) (Stage, error) {
	var st Stage
	words := strings.Fields(in.Args)
	for len(words) > 0 && strings.HasPrefix(words[0], "--") {
		if p, ok := strings.CutPrefix(words[0], "--platform="); ok {
			st.Platform = p
		} else {
			return st, fmt.Errorf("line %d: FROM flag %s not understood", in.Line, words[0])
		}
		words = words[1:]
	}
	switch {
	case len(words) == 1:
	case len(words) == 3 && strings.EqualFold(words[1], "AS"):
		st.Name = words[2]
	default:
		return st, fmt.Errorf("line %d: FROM %q not understood", in.Line, in.Args)
	}
	var bad error
	st.From = argRef.ReplaceAllStringFunc(words[0], func(ref string) string {
		m := argRef.FindStringSubmatch(ref)
		name := m[1] + m[2]
		v, ok := args[name]
		if !ok {
			bad = fmt.Errorf("line %d: FROM uses $%s, which no ARG before the first FROM defines", in.Line, name)
		}
		return v
	})
	return st, bad
}

// Stage returns the stage named name, or nil.
func (d *Dockerfile) Stage(name string) *Stage {
	for i := range d.Stages {
		if d.Stages[i].Name == name {
			return &d.Stages[i]
		}
	}
	return nil
}

// Runtime is what the last stage of the Dockerfile says the image holds.
type Runtime struct {
	Base       string            // FROM of the runtime stage
	BuildBase  string            // FROM of the stage its COPY --from lines name
	Packages   []string          // apt-get install arguments, sorted
	Groups     []Account         // groupadd
	Users      []Account         // useradd
	Files      map[string]string // destination path → source path in the build stage (COPY --from=build)
	Symlinks   map[string]string // link path → target, as written (RUN ln -s)
	Labels     map[string]string
	User       string
	Entrypoint []string
	// From the build stage's go build line.
	GoBinaries []string // the build loop's list
	GoBuild    GoBuild
}

// Account is a group or user the runtime stage creates.
type Account struct {
	Name   string
	ID     int    // --gid for a group, --uid for a user
	GID    int    // users: --gid
	Shell  string // users: --shell
	System bool
}

// GoBuild is what the build stage's go build line asks for.
type GoBuild struct {
	CGOEnabled string // CGO_ENABLED=…
	Trimpath   bool
	LDFlags    string
	OutputDir  string // -o DIR/$b
}

// Runtime interprets the last stage. Every instruction must be understood.
func (d *Dockerfile) Runtime() (*Runtime, error) {
	st := d.Stages[len(d.Stages)-1]
	rt := &Runtime{Base: st.From, Files: map[string]string{}, Symlinks: map[string]string{}, Labels: map[string]string{}}
	var buildStage string
	for _, in := range st.Body {
		switch in.Cmd {
		case "RUN":
			if err := rt.run(in); err != nil {
				return nil, err
			}
		case "COPY":
			words := strings.Fields(in.Args)
			from := ""
			for len(words) > 0 && strings.HasPrefix(words[0], "--") {
				f, ok := strings.CutPrefix(words[0], "--from=")
				if !ok {
					return nil, fmt.Errorf("line %d: COPY flag %s not understood", in.Line, words[0])
				}
				from = f
				words = words[1:]
			}
			if from == "" || len(words) != 2 {
				return nil, fmt.Errorf("line %d: only COPY --from=STAGE SRC DST is understood, got %q", in.Line, in.Args)
			}
			if buildStage != "" && buildStage != from {
				return nil, fmt.Errorf("line %d: COPY from a second stage %q", in.Line, from)
			}
			buildStage = from
			rt.Files[words[1]] = words[0]
		case "LABEL":
			kv, err := shellWords(in.Args)
			if err != nil {
				return nil, fmt.Errorf("line %d: LABEL: %w", in.Line, err)
			}
			for _, w := range kv {
				k, v, ok := strings.Cut(w, "=")
				if !ok {
					return nil, fmt.Errorf("line %d: LABEL %q is not key=value", in.Line, w)
				}
				rt.Labels[k] = v
			}
		case "USER":
			rt.User = in.Args
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.Args), &rt.Entrypoint); err != nil {
				return nil, fmt.Errorf("line %d: only the JSON form of ENTRYPOINT is understood: %w", in.Line, err)
			}
		default:
			return nil, fmt.Errorf("line %d: %s in the runtime stage is not understood by the image check (conformance/image)", in.Line, in.Cmd)
		}
	}
	sort.Strings(rt.Packages)
	if buildStage != "" {
		bs := d.Stage(buildStage)
		if bs == nil {
			return nil, fmt.Errorf("COPY --from=%s: no such stage", buildStage)
		}
		rt.BuildBase = bs.From
		if err := rt.goBuild(bs); err != nil {
			return nil, err
		}
	}
	return rt, nil
}

// run interprets the commands of one RUN line: a && / ; list of simple commands.
func (rt *Runtime) run(in Instruction) error {
	for _, c := range regexp.MustCompile(`&&|;`).Split(in.Args, -1) {
		w, err := shellWords(c)
		if err != nil {
			return fmt.Errorf("line %d: %w", in.Line, err)
		}
		if len(w) == 0 {
			continue
		}
		switch {
		case w[0] == "apt-get" && len(w) > 1 && w[1] == "update":
		case w[0] == "apt-get" && len(w) > 1 && w[1] == "install":
			for _, a := range w[2:] {
				if !strings.HasPrefix(a, "-") {
					rt.Packages = append(rt.Packages, a)
				}
			}
		case w[0] == "rm" && strings.Join(w, " ") == "rm -rf /var/lib/apt/lists/*":
		case w[0] == "groupadd" || w[0] == "useradd":
			a, err := account(w)
			if err != nil {
				return fmt.Errorf("line %d: %w", in.Line, err)
			}
			if w[0] == "groupadd" {
				rt.Groups = append(rt.Groups, a)
			} else {
				rt.Users = append(rt.Users, a)
			}
		case w[0] == "ln" && len(w) == 4 && w[1] == "-s":
			rt.Symlinks[w[3]] = w[2]
		default:
			return fmt.Errorf("line %d: command %q in the runtime stage's RUN is not understood by the image check (conformance/image)", in.Line, strings.Join(w, " "))
		}
	}
	return nil
}

func account(w []string) (Account, error) {
	a := Account{ID: -1, GID: -1}
	for i := 1; i < len(w); i++ {
		next := func() (string, error) {
			if i+1 >= len(w) {
				return "", fmt.Errorf("%s: %s needs a value", w[0], w[i])
			}
			i++
			return w[i], nil
		}
		var err error
		var v string
		switch w[i] {
		case "--system", "-r":
			a.System = true
		case "--no-create-home", "-M":
		case "--gid", "-g":
			if v, err = next(); err == nil {
				if w[0] == "groupadd" {
					a.ID, err = strconv.Atoi(v)
				} else {
					a.GID, err = strconv.Atoi(v)
				}
			}
		case "--uid", "-u":
			if v, err = next(); err == nil {
				a.ID, err = strconv.Atoi(v)
			}
		case "--shell", "-s":
			a.Shell, err = next()
		default:
			if strings.HasPrefix(w[i], "-") {
				return a, fmt.Errorf("%s: option %s not understood", w[0], w[i])
			}
			if a.Name != "" {
				return a, fmt.Errorf("%s: two names %s and %s", w[0], a.Name, w[i])
			}
			a.Name = w[i]
		}
		if err != nil {
			return a, fmt.Errorf("%s: %w", w[0], err)
		}
	}
	if a.Name == "" || a.ID < 0 {
		return a, fmt.Errorf("%s without a name or a fixed id", w[0])
	}
	return a, nil
}

var (
	buildLoop  = regexp.MustCompile(`for b in ([^;]+);`)
	goBuildCmd = regexp.MustCompile(`go build ([^;]*)-o (\S+)/\$b \./cmd/\$b`)
	ldflags    = regexp.MustCompile(`-ldflags '([^']*)'`)
	cgo        = regexp.MustCompile(`CGO_ENABLED=(\S+)`)
)

func (rt *Runtime) goBuild(bs *Stage) error {
	for _, in := range bs.Body {
		if in.Cmd != "RUN" || !strings.Contains(in.Args, "go build") {
			continue
		}
		loop := buildLoop.FindStringSubmatch(in.Args)
		gb := goBuildCmd.FindStringSubmatch(in.Args)
		if loop == nil || gb == nil {
			return fmt.Errorf("line %d: the build stage's go build is not `for b in …; do … go build … -o DIR/$b ./cmd/$b; done`", in.Line)
		}
		rt.GoBinaries = strings.Fields(loop[1])
		rt.GoBuild.OutputDir = gb[2]
		rt.GoBuild.Trimpath = strings.Contains(gb[1], "-trimpath")
		if m := ldflags.FindStringSubmatch(gb[1]); m != nil {
			rt.GoBuild.LDFlags = m[1]
		}
		if m := cgo.FindStringSubmatch(in.Args); m != nil {
			rt.GoBuild.CGOEnabled = m[1]
		}
		return nil
	}
	return fmt.Errorf("stage %s has no go build", bs.Name)
}

// shellWords splits s into words as a POSIX shell would for the simple cases used
// here: whitespace separates, '…' is literal, "…" honours \" and \\.
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated ' in %q", s)
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\\') {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated \" in %q", s)
			}
			inWord = true
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

func unquote(s string) string {
	if w, err := shellWords(s); err == nil && len(w) == 1 {
		return w[0]
	}
	return s
}
