package loopctl_test

import (
	"fmt"
	"go/importer"
	"go/token"
	"go/types"
	"os"
	"slices"
	"strings"
	"testing"
)

// apiFile records the exported API of the module's packages, one line per
// exported identifier, as Go's api/ files do. A change of the API changes
// it too (LOOPCTL_API_UPDATE=1 go test -run TestAPI . writes it), and is
// listed in CHANGELOG.md.
const apiFile = "api/v0.txt"

// apiPackages are the packages whose API is recorded.
var apiPackages = []string{"github.com/loopctl/loopctl", "github.com/loopctl/loopctl/uevent"}

// TestAPI fails when the exported API differs from apiFile: every change
// to it is deliberate.
func TestAPI(t *testing.T) {
	if testing.Short() {
		t.Skip("type-checks the packages from source")
	}
	if _, err := os.Stat("go.mod"); err != nil {
		t.Skip("run outside the source tree: it type-checks the packages from source")
	}
	imp := importer.ForCompiler(token.NewFileSet(), "source", nil)
	var got []string
	for _, path := range apiPackages {
		pkg, err := imp.Import(path)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, apiLines(pkg)...)
	}
	slices.Sort(got)
	if os.Getenv("LOOPCTL_API_UPDATE") == "1" {
		if err := os.WriteFile(apiFile, []byte(strings.Join(got, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	b, err := os.ReadFile(apiFile)
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	var added, removed []string
	for _, l := range got {
		if !slices.Contains(want, l) {
			added = append(added, "+"+l)
		}
	}
	for _, l := range want {
		if !slices.Contains(got, l) {
			removed = append(removed, "-"+l)
		}
	}
	if len(added)+len(removed) > 0 {
		t.Errorf("the exported API differs from %s; if the change is meant, write it anew (LOOPCTL_API_UPDATE=1 go test -run TestAPI .) "+
			"and say it in CHANGELOG.md:\n%s", apiFile, strings.Join(append(removed, added...), "\n"))
	}
}

// apiLines returns a line for each exported identifier of pkg: its
// constants (with their values), variables, functions, types, their
// exported fields and methods.
func apiLines(pkg *types.Package) []string {
	qual := func(p *types.Package) string {
		if p == pkg {
			return ""
		}
		return p.Name()
	}
	prefix := "pkg " + pkg.Path() + ", "
	var lines []string
	add := func(format string, args ...any) { lines = append(lines, prefix+fmt.Sprintf(format, args...)) }
	scope := pkg.Scope()
	for _, name := range scope.Names() {
		obj := scope.Lookup(name)
		if !obj.Exported() {
			continue
		}
		switch obj := obj.(type) {
		case *types.Const:
			add("const %s %s = %s", name, types.TypeString(obj.Type(), qual), obj.Val().ExactString())
		case *types.Var:
			add("var %s %s", name, types.TypeString(obj.Type(), qual))
		case *types.Func:
			add("func %s%s", name, strings.TrimPrefix(types.TypeString(obj.Type(), qual), "func"))
		case *types.TypeName:
			switch u := obj.Type().Underlying().(type) {
			case *types.Struct:
				add("type %s struct", name)
				for i := range u.NumFields() {
					if f := u.Field(i); f.Exported() {
						add("type %s struct, %s %s", name, f.Name(), types.TypeString(f.Type(), qual))
					}
				}
			case *types.Interface:
				add("type %s interface", name)
				for i := range u.NumMethods() {
					if m := u.Method(i); m.Exported() {
						add("type %s interface, %s%s", name, m.Name(), strings.TrimPrefix(types.TypeString(m.Type(), qual), "func"))
					}
				}
			default:
				add("type %s %s", name, types.TypeString(u, qual))
			}
			mset := types.NewMethodSet(types.NewPointer(obj.Type()))
			for i := range mset.Len() {
				m := mset.At(i).Obj()
				if !m.Exported() {
					continue
				}
				recv := m.Type().(*types.Signature).Recv().Type()
				add("method (%s) %s%s", types.TypeString(recv, qual), m.Name(),
					strings.TrimPrefix(types.TypeString(m.Type(), qual), "func"))
			}
		}
	}
	return lines
}
