package main

import (
	"fmt"
	"math/big"
	"net"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// Bounds on builtins whose allocation grows with the values of their arguments (not their size):
// past a bound the evaluation halts with an error (the gateway denies the call) before anything is
// allocated. In OPA they would allocate until the process dies; in the gateway's process that
// would take every call down. Within the bounds the builtin is OPA's own, unchanged.
const (
	MaxRangeNumbers = 100_000          // numbers.range, numbers.range_step: elements
	MaxCIDRHostBits = 16               // net.cidr_expand: at most 2^16 = 65,536 addresses
	MaxShiftBits    = 65_536           // bits.lsh: shift
	MaxReplacedLen  = 16 * 1024 * 1024 // replace, strings.replace_n: bytes of the result
	MaxGlobPattern  = 4096             // regex.globs_match: bytes of each pattern
	MaxProduced     = MaxReplacedLen   // regex.replace, json.patch, strings.render_template: bytes of the result
)

func halt(name, format string, args ...any) error {
	return topdown.Halt{Err: &topdown.Error{
		Code:    topdown.BuiltinErr,
		Message: name + ": " + fmt.Sprintf(format, args...) + " (a bound of the embedded engine)",
	}}
}

// bound runs check before OPA's own implementation; check returns nil to let OPA decide
// (including OPA's own errors for wrongly typed operands).
func bound(name string, check func(operands []*ast.Term) error) {
	original := topdown.GetBuiltin(name)
	if original == nil {
		panic("no builtin " + name)
	}
	topdown.RegisterBuiltinFunc(name, func(bctx topdown.BuiltinContext, operands []*ast.Term, iter func(*ast.Term) error) error {
		if err := check(operands); err != nil {
			return err
		}
		return original(bctx, operands, iter)
	})
}

func integer(t *ast.Term) (*big.Int, bool) {
	n, ok := t.Value.(ast.Number)
	if !ok {
		return nil, false
	}
	r, ok := new(big.Rat).SetString(string(n))
	if !ok || !r.IsInt() {
		return nil, false
	}
	return r.Num(), true
}

func str(t *ast.Term) (string, bool) {
	s, ok := t.Value.(ast.String)
	return string(s), ok
}

func rangeCheck(name string, stepped bool) func([]*ast.Term) error {
	return func(operands []*ast.Term) error {
		x, ok1 := integer(operands[0])
		y, ok2 := integer(operands[1])
		step := big.NewInt(1)
		ok3 := true
		if stepped {
			step, ok3 = integer(operands[2])
		}
		if !ok1 || !ok2 || !ok3 || step.Sign() <= 0 {
			return nil
		}
		span := new(big.Int).Sub(y, x)
		span.Abs(span).Quo(span, step)
		if span.Cmp(big.NewInt(MaxRangeNumbers-1)) > 0 {
			return halt(name, "more than %d numbers", MaxRangeNumbers)
		}
		return nil
	}
}

func replacedLen(s, old, new string) int64 {
	if old == "" {
		return int64(len(s)) + int64(utf8.RuneCountInString(s)+1)*int64(len(new))
	}
	return int64(len(s)) + int64(strings.Count(s, old))*int64(len(new))
}

// templateBound: Go's text/template repeats what a `range` encloses for each element, so nested
// ranges (or `template` calls) multiply: bound the output by len(template) * size(vars)^nesting.
func templateBound(operands []*ast.Term) error {
	tmpl, ok := str(operands[0])
	if !ok {
		return nil
	}
	loops := strings.Count(tmpl, "range") + strings.Count(tmpl, "template")
	size := float64(len(operands[1].String()))
	estimate := float64(len(tmpl))
	for i := 0; i < loops && estimate <= MaxProduced; i++ {
		estimate *= size
	}
	if estimate > MaxProduced {
		return halt("strings.render_template", "a template whose loops over these values may produce more than %d bytes", MaxProduced)
	}
	return nil
}

// regexReplaceBound: every match is replaced by the value, whose $-references expand to (at most)
// the whole input each.
func regexReplaceBound(operands []*ast.Term) error {
	base, ok1 := str(operands[0])
	pattern, ok2 := str(operands[1])
	value, ok3 := str(operands[2])
	if !ok1 || !ok2 || !ok3 {
		return nil
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return nil // OPA reports it
	}
	per := int64(len(value)) + int64(strings.Count(value, "$"))*int64(len(base))
	if per == 0 {
		return nil
	}
	matches := int64(len(re.FindAllStringIndex(base, -1)))
	if int64(len(base))+matches*per > MaxProduced {
		return halt("regex.replace", "a result of more than %d bytes", MaxProduced)
	}
	return nil
}

// jsonPatchBound: a `copy` can double the document, so c copies can multiply it by 2^c.
func jsonPatchBound(operands []*ast.Term) error {
	patches, ok := operands[1].Value.(*ast.Array)
	if !ok {
		return nil
	}
	copies := 0
	patches.Foreach(func(t *ast.Term) {
		if obj, ok := t.Value.(ast.Object); ok {
			if op := obj.Get(ast.StringTerm("op")); op != nil && op.Equal(ast.StringTerm("copy")) {
				copies++
			}
		}
	})
	estimate := float64(len(operands[0].String()) + len(operands[1].String()))
	for i := 0; i < copies && estimate <= MaxProduced; i++ {
		estimate *= 2
	}
	if copies > 0 && estimate > MaxProduced {
		return halt("json.patch", "%d copy operations that may produce more than %d bytes", copies, MaxProduced)
	}
	return nil
}

func depth(v ast.Value) int {
	deepest := 0
	visit := func(t *ast.Term) {
		if d := depth(t.Value); d > deepest {
			deepest = d
		}
	}
	switch x := v.(type) {
	case *ast.Array:
		x.Foreach(visit)
	case ast.Set:
		x.Foreach(visit)
	case ast.Object:
		x.Foreach(func(_, value *ast.Term) { visit(value) })
	default:
		return 0
	}
	return deepest + 1
}

// marshalBound: pretty JSON repeats the prefix on every line and the indent once per level.
func marshalBound(operands []*ast.Term) error {
	opts, ok := operands[1].Value.(ast.Object)
	if !ok {
		return nil
	}
	width := 0
	for _, key := range []string{"indent", "prefix"} {
		if v := opts.Get(ast.StringTerm(key)); v != nil {
			if s, ok := str(v); ok {
				width += len(s)
			}
		}
	}
	size := float64(len(operands[0].String()))
	if width > 0 && size*float64(width)*float64(depth(operands[0].Value)+1) > MaxProduced {
		return halt("json.marshal_with_options", "a result of more than %d bytes", MaxProduced)
	}
	return nil
}

func init() {
	bound("json.marshal_with_options", marshalBound)
	bound("strings.render_template", templateBound)
	bound("regex.replace", regexReplaceBound)
	bound("json.patch", jsonPatchBound)
	bound("numbers.range", rangeCheck("numbers.range", false))
	bound("numbers.range_step", rangeCheck("numbers.range_step", true))
	bound("net.cidr_expand", func(operands []*ast.Term) error {
		s, ok := str(operands[0])
		if !ok {
			return nil
		}
		_, network, err := net.ParseCIDR(s)
		if err != nil {
			return nil
		}
		ones, bits := network.Mask.Size()
		if bits-ones > MaxCIDRHostBits {
			return halt("net.cidr_expand", "more than 2^%d addresses", MaxCIDRHostBits)
		}
		return nil
	})
	bound("bits.lsh", func(operands []*ast.Term) error {
		shift, ok := integer(operands[1])
		if ok && shift.Cmp(big.NewInt(MaxShiftBits)) > 0 {
			return halt("bits.lsh", "a shift of more than %d bits", MaxShiftBits)
		}
		return nil
	})
	bound("replace", func(operands []*ast.Term) error {
		s, ok1 := str(operands[0])
		old, ok2 := str(operands[1])
		new, ok3 := str(operands[2])
		if ok1 && ok2 && ok3 && replacedLen(s, old, new) > MaxReplacedLen {
			return halt("replace", "a result of more than %d bytes", MaxReplacedLen)
		}
		return nil
	})
	bound("strings.replace_n", func(operands []*ast.Term) error {
		patterns, ok1 := operands[0].Value.(ast.Object)
		s, ok2 := str(operands[1])
		if !ok1 || !ok2 {
			return nil
		}
		total := int64(len(s))
		for _, key := range patterns.Keys() {
			old, ok3 := str(key)
			new, ok4 := str(patterns.Get(key))
			if ok3 && ok4 {
				total += replacedLen(s, old, new) - int64(len(s))
			}
		}
		if total > MaxReplacedLen {
			return halt("strings.replace_n", "a result of more than %d bytes", MaxReplacedLen)
		}
		return nil
	})
	bound("regex.globs_match", func(operands []*ast.Term) error {
		for _, t := range operands {
			if s, ok := str(t); ok && len(s) > MaxGlobPattern {
				return halt("regex.globs_match", "a pattern of more than %d bytes", MaxGlobPattern)
			}
		}
		return nil
	})
}
