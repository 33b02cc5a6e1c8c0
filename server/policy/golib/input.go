package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/open-policy-agent/opa/v1/ast"
)

// parseInput parses a JSON document straight to an ast.Value: the value that
// ast.InterfaceToValue gives for util.UnmarshalJSON's parse (numbers kept exact), without the
// intermediate Go maps and slices, which were ~a fifth of an evaluation call's CPU for the default
// policy's input. Each leaf is converted by ast.InterfaceToValue itself (json.Number, string, bool,
// nil), and a string with an escape or a byte outside printable ASCII is unquoted by encoding/json,
// so numbers, escapes, surrogates and invalid UTF-8 come out exactly as before; this parser only
// walks the structure. A repeated key keeps its last value (encoding/json into a map). Nesting past
// encoding/json's limit (10,000) is an error, as are trailing data, NaN and anything else not JSON.
// input_test.go checks it against the old parse on generated and malformed documents.
func parseInput(data []byte) (ast.Value, error) {
	p := parser{data: data, text: string(data)}
	p.space()
	value, err := p.value(0)
	if err != nil {
		return nil, err
	}
	p.space()
	if p.pos != len(p.data) {
		return nil, p.fail("after top-level value")
	}
	return value, nil
}

const maxNesting = 10000 // encoding/json's

type parser struct {
	data []byte
	pos  int
	// text is data copied once: a string without escapes is a slice of it, not a copy of its own.
	text string
	// terms is where the next terms are taken from, a block at a time rather than one by one.
	terms []ast.Term
	// items holds the members of the objects being parsed, innermost last: one slice for all.
	items [][2]*ast.Term
}

const termBlock = 64

// term is a new term holding value, from the parser's current block.
func (p *parser) term(value ast.Value) *ast.Term {
	if len(p.terms) == 0 {
		p.terms = make([]ast.Term, termBlock)
	}
	t := &p.terms[0]
	p.terms = p.terms[1:]
	t.Value = value
	return t
}

var errNesting = errors.New("exceeded max depth")

func (p *parser) fail(where string) error {
	if p.pos >= len(p.data) {
		return errors.New("unexpected end of JSON input")
	}
	return fmt.Errorf("invalid character %q %s at offset %d", p.data[p.pos], where, p.pos)
}

func (p *parser) space() {
	for p.pos < len(p.data) {
		switch p.data[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

func (p *parser) value(depth int) (ast.Value, error) {
	if p.pos >= len(p.data) {
		return nil, p.fail("")
	}
	switch c := p.data[p.pos]; {
	case c == '{':
		return p.object(depth + 1)
	case c == '[':
		return p.array(depth + 1)
	case c == '"':
		s, err := p.str()
		if err != nil {
			return nil, err
		}
		return ast.InterfaceToValue(s)
	case c == '-' || (c >= '0' && c <= '9'):
		return p.number()
	default:
		for _, literal := range [...]struct {
			text  string
			value any
		}{{"true", true}, {"false", false}, {"null", nil}} {
			if len(p.data)-p.pos >= len(literal.text) && string(p.data[p.pos:p.pos+len(literal.text)]) == literal.text {
				p.pos += len(literal.text)
				return ast.InterfaceToValue(literal.value)
			}
		}
		return nil, p.fail("looking for beginning of value")
	}
}

func (p *parser) object(depth int) (ast.Value, error) {
	if depth > maxNesting {
		return nil, errNesting
	}
	p.pos++                 // {
	base := len(p.items)    // this object's members are p.items[base:] until it ends
	var seen map[string]int // key -> index in items, built only when a key repeats could matter
	p.space()
	if p.pos < len(p.data) && p.data[p.pos] == '}' {
		p.pos++
		return ast.NewObject(), nil
	}
	for {
		p.space()
		if p.pos >= len(p.data) || p.data[p.pos] != '"' {
			return nil, p.fail("looking for beginning of object key string")
		}
		key, err := p.str()
		if err != nil {
			return nil, err
		}
		p.space()
		if p.pos >= len(p.data) || p.data[p.pos] != ':' {
			return nil, p.fail("after object key")
		}
		p.pos++
		p.space()
		value, err := p.value(depth)
		if err != nil {
			return nil, err
		}
		keyValue, err := ast.InterfaceToValue(key)
		if err != nil {
			return nil, err
		}
		items := p.items[base:]
		if len(items) >= 8 && seen == nil {
			seen = make(map[string]int, 2*len(items))
			for i, item := range items {
				seen[string(item[0].Value.(ast.String))] = i
			}
		}
		index := -1
		if seen != nil {
			if i, ok := seen[key]; ok {
				index = i
			}
		} else {
			for i, item := range items {
				if string(item[0].Value.(ast.String)) == key {
					index = i
					break
				}
			}
		}
		if index >= 0 {
			items[index][1] = p.term(value) // the last value wins, as with encoding/json
		} else {
			if seen != nil {
				seen[key] = len(items)
			}
			p.items = append(p.items, [2]*ast.Term{p.term(keyValue), p.term(value)})
		}
		if done, err := p.separator('}', "after object key:value pair"); err != nil || done {
			if err != nil {
				return nil, err
			}
			object := ast.NewObject(p.items[base:]...) // which copies the members
			p.items = p.items[:base]
			return object, nil
		}
	}
}

// separator consumes what follows a member of an object or array: a comma (false: another member
// follows) or `close` (true: the container ends); anything else is an error naming `where`.
func (p *parser) separator(close byte, where string) (bool, error) {
	p.space()
	if p.pos >= len(p.data) {
		return false, p.fail("")
	}
	switch p.data[p.pos] {
	case ',':
		p.pos++
		return false, nil
	case close:
		p.pos++
		return true, nil
	default:
		return false, p.fail(where)
	}
}

func (p *parser) array(depth int) (ast.Value, error) {
	if depth > maxNesting {
		return nil, errNesting
	}
	p.pos++ // [
	var terms []*ast.Term
	p.space()
	if p.pos < len(p.data) && p.data[p.pos] == ']' {
		p.pos++
		return ast.NewArray(), nil
	}
	for {
		p.space()
		value, err := p.value(depth)
		if err != nil {
			return nil, err
		}
		terms = append(terms, p.term(value))
		if done, err := p.separator(']', "after array element"); err != nil || done {
			if err != nil {
				return nil, err
			}
			return ast.NewArray(terms...), nil
		}
	}
}

// str reads a string at p.pos (its opening quote): printable ASCII without escapes as it is,
// anything else through encoding/json's own unquoting.
func (p *parser) str() (string, error) {
	start := p.pos
	p.pos++
	plain := true
	for p.pos < len(p.data) {
		c := p.data[p.pos]
		switch {
		case c == '"':
			p.pos++
			if plain {
				return p.text[start+1 : p.pos-1], nil
			}
			var s string
			if err := json.Unmarshal(p.data[start:p.pos], &s); err != nil {
				return "", err
			}
			return s, nil
		case c == '\\':
			plain = false
			p.pos += 2 // the escaped byte is never the closing quote; encoding/json checks the escape
		case c < 0x20:
			return "", p.fail("in string literal")
		default:
			if c >= 0x80 {
				plain = false
			}
			p.pos++
		}
	}
	return "", errors.New("unexpected end of JSON input")
}

// number reads a number in JSON's grammar, converted exactly as ast.InterfaceToValue converts the
// json.Number that util.UnmarshalJSON gives.
func (p *parser) number() (ast.Value, error) {
	start := p.pos
	digits := func() int {
		n := 0
		for p.pos < len(p.data) && p.data[p.pos] >= '0' && p.data[p.pos] <= '9' {
			p.pos++
			n++
		}
		return n
	}
	if p.data[p.pos] == '-' {
		p.pos++
	}
	if p.pos < len(p.data) && p.data[p.pos] == '0' {
		p.pos++
	} else if digits() == 0 {
		return nil, p.fail("in numeric literal")
	}
	if p.pos < len(p.data) && p.data[p.pos] == '.' {
		p.pos++
		if digits() == 0 {
			return nil, p.fail("after decimal point in numeric literal")
		}
	}
	if p.pos < len(p.data) && (p.data[p.pos] == 'e' || p.data[p.pos] == 'E') {
		p.pos++
		if p.pos < len(p.data) && (p.data[p.pos] == '+' || p.data[p.pos] == '-') {
			p.pos++
		}
		if digits() == 0 {
			return nil, p.fail("in exponent of numeric literal")
		}
	}
	return ast.InterfaceToValue(json.Number(p.data[start:p.pos]))
}
