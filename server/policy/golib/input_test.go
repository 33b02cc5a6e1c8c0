package main

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/util"
)

// oldParse is how castellan_eval parsed its input before parseInput.
func oldParse(data []byte) (ast.Value, error) {
	var document any
	if err := util.UnmarshalJSON(data, &document); err != nil {
		return nil, err
	}
	return ast.InterfaceToValue(document)
}

// same fails unless both parses fail, or both give the same value: equal by ast.Compare, and
// with the same canonical JSON (so numbers keep the same text: 1.0 stays 1.0, 1e400 stays 1e400).
func same(t *testing.T, doc []byte) {
	t.Helper()
	want, wantErr := oldParse(doc)
	got, gotErr := parseInput(doc)
	if wantErr == nil && gotErr != nil && trailingNull(doc) {
		return // the old parse's one leniency: see trailingNull
	}
	if (wantErr != nil) != (gotErr != nil) {
		t.Fatalf("%q: old error %v, new error %v", truncate(doc), wantErr, gotErr)
	}
	if wantErr != nil {
		return
	}
	if ast.Compare(want, got) != 0 {
		t.Fatalf("%q: old %v, new %v", truncate(doc), want, got)
	}
	wantJSON, err1 := ast.JSON(want)
	gotJSON, err2 := ast.JSON(got)
	if err1 != nil || err2 != nil {
		t.Fatalf("%q: %v %v", truncate(doc), err1, err2)
	}
	a, _ := json.Marshal(wantJSON)
	b, _ := json.Marshal(gotJSON)
	if string(a) != string(b) {
		t.Fatalf("%q: old %s, new %s", truncate(doc), a, b)
	}
	if want.String() != got.String() {
		t.Fatalf("%q: old %s, new %s", truncate(doc), want.String(), got.String())
	}
}

// trailingNull: a document of one value and then `null` (and anything after it), which
// util.UnmarshalJSON accepts, as the value alone: its check for trailing data reads one more token
// and takes a nil token (`null`) for the end. parseInput refuses it, as encoding/json does; the
// gateway sends one json.dumps document, never such a thing.
func trailingNull(doc []byte) bool {
	decoder := json.NewDecoder(strings.NewReader(string(doc)))
	var first any
	if decoder.Decode(&first) != nil {
		return false
	}
	rest := strings.TrimLeft(string(doc[decoder.InputOffset():]), " \t\r\n")
	return strings.HasPrefix(rest, "null")
}

func TestParseInputTrailingNull(t *testing.T) {
	for _, doc := range []string{`0null`, `{} null`, `[1] null x`} {
		if _, err := oldParse([]byte(doc)); err != nil {
			t.Fatalf("%q: the old parse refuses it now (%v): drop trailingNull", doc, err)
		}
		if _, err := parseInput([]byte(doc)); err == nil {
			t.Fatalf("%q: accepted", doc)
		}
	}
}

func truncate(doc []byte) string {
	if len(doc) > 300 {
		return string(doc[:300]) + "..."
	}
	return string(doc)
}

var odd = []string{
	``, ` `, `{`, `}`, `[`, `]`, `[1,]`, `{"a":1,}`, `{"a"}`, `{"a":}`, `{1:2}`, `[1 2]`, `{"a":1 "b":2}`,
	`nul`, `tru`, `falsey`, `NaN`, `Infinity`, `-Infinity`, `nulll`, `[true false]`,
	`0`, `-0`, `-0.0`, `0.0`, `00`, `01`, `-01`, `1.`, `.1`, `-`, `+1`, `1e`, `1e+`, `1E-0`, `1e400`, `-1e-400`,
	`123456789012345678901234567890`, `1.000000000000000000001`, `9007199254740993`, `-9223372036854775809`,
	`18446744073709551616`, `1E+2`, `0e0`, `5e-324`, `1.7976931348623157e309`, `100`, `-100`, `512`, `1024`,
	`"a"`, `""`, `"\u0000"`, `"\ud800"`, `"\udc00"`, `"\ud83d\ude00"`, `"\ud83d"`, `"\ud83dx"`, `"\ud83d\u0041"`,
	`"\x"`, `"\u12"`, `"\u12G4"`, `"\/\b\f\n\r\t\"\\"`, "\"\x01\"", "\"\x7f\"", "\"\xff\"", "\"\xc3\xa9\"",
	"\"\xe2\x82\"", "\"\xed\xa0\x80\"", "\"\xf0\x9f\x98\x80\"", `"é"`, `"日本"`, `"\u00e9"`, `"abc`, `"abc\"`,
	`{"a":1,"a":2}`, `{"a":{"b":1},"a":[2]}`, `{"k":1,"k":2,"k":3,"j":0,"k":4}`, ` [ 1 , { "a" : null } ] `,
	"\t\n\r{}\r\n", `{} {}`, `[] x`, `{}x`, `"a" "b"`, `1 2`, `[1]]`, `{"a":1}}`, "{\"a\":1}\x00",
	`{"":""}`, `[[[[[]]]]]`, `[{}]`, `{"a":[]}`,
}

func TestParseInputOdd(t *testing.T) {
	for _, doc := range odd {
		same(t, []byte(doc))
	}
	keys := make([]string, 0, 40)
	for i := 0; i < 40; i++ {
		keys = append(keys, fmt.Sprintf(`"k%d":%d`, i%13, i)) // repeats past the small-object scan
	}
	same(t, []byte("{"+strings.Join(keys, ",")+"}"))
}

func TestParseInputNesting(t *testing.T) {
	for _, depth := range []int{1, 100, 9999, 10000, 10001, 20000} {
		same(t, []byte(strings.Repeat("[", depth)+strings.Repeat("]", depth)))
		same(t, []byte(strings.Repeat(`{"a":`, depth)+"1"+strings.Repeat("}", depth)))
		same(t, []byte(strings.Repeat(`[{"a":`, depth/2)+"1"+strings.Repeat("}]", depth/2)))
	}
}

var runes = []rune{'a', 'Z', '0', ' ', '"', '\\', '/', '\n', '\t', 0, 0x1f, 0x7f, 0x80, 0xe9, 0x2028, 0xfeff,
	0xfffd, 0xffff, 0x1f600, 0x10ffff, 0xd800, 0xdfff}

func randomString(r *rand.Rand) string {
	var b strings.Builder
	b.WriteByte('"')
	for n := r.Intn(12); n > 0; n-- {
		switch k := r.Intn(10); {
		case k < 4:
			b.WriteByte(byte('a' + r.Intn(26)))
		case k < 6: // an escape, valid or not
			escapes := []string{`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`, `\u0041`, `\u00e9`, `\ud83d\ude00`,
				`\ud800`, `\udfff`, `\ud800\ud800`, `\u0000`, `\uFFFF`, `\q`, `\u12`}
			b.WriteString(escapes[r.Intn(len(escapes))])
		case k < 8:
			b.WriteRune(runes[r.Intn(len(runes))]) // encodes invalid runes (surrogates) as U+FFFD
		default: // a raw byte, maybe invalid UTF-8 or a control character
			b.WriteByte(byte(r.Intn(256)))
		}
	}
	b.WriteByte('"')
	return b.String()
}

func randomNumber(r *rand.Rand) string {
	var b strings.Builder
	if r.Intn(3) == 0 {
		b.WriteByte('-')
	}
	switch r.Intn(4) {
	case 0:
		b.WriteByte('0')
	case 1:
		b.WriteString(fmt.Sprint(r.Intn(1000)))
	case 2:
		b.WriteString(fmt.Sprint(r.Uint64()))
	default:
		for n := 1 + r.Intn(40); n > 0; n-- {
			b.WriteByte(byte('1' + r.Intn(9)))
		}
	}
	if r.Intn(3) == 0 {
		b.WriteString("." + strings.Repeat(fmt.Sprint(r.Intn(10)), 1+r.Intn(25)))
	}
	if r.Intn(4) == 0 {
		b.WriteString([]string{"e", "E", "e+", "e-", "E-"}[r.Intn(5)] + fmt.Sprint(r.Intn(500)))
	}
	return b.String()
}

func randomValue(r *rand.Rand, depth int) string {
	k := r.Intn(10)
	if depth > 6 {
		k %= 5
	}
	switch k {
	case 0:
		return []string{"true", "false", "null"}[r.Intn(3)]
	case 1, 2:
		return randomNumber(r)
	case 3, 4:
		return randomString(r)
	case 5, 6, 7:
		parts := []string{}
		for n := r.Intn(6); n > 0; n-- {
			key := randomString(r)
			if r.Intn(3) == 0 {
				key = fmt.Sprintf(`"k%d"`, r.Intn(3)) // repeated keys
			}
			parts = append(parts, key+space(r)+":"+space(r)+randomValue(r, depth+1))
		}
		return "{" + space(r) + strings.Join(parts, space(r)+","+space(r)) + space(r) + "}"
	default:
		parts := []string{}
		for n := r.Intn(6); n > 0; n-- {
			parts = append(parts, randomValue(r, depth+1))
		}
		return "[" + strings.Join(parts, ","+space(r)) + "]"
	}
}

func space(r *rand.Rand) string {
	return []string{"", "", "", " ", "\n", "\t ", "\r\n"}[r.Intn(7)]
}

// mutate breaks a document the way truncation, stray bytes and lost characters do.
func mutate(r *rand.Rand, doc string) string {
	if len(doc) == 0 {
		return doc
	}
	i := r.Intn(len(doc))
	switch r.Intn(4) {
	case 0:
		return doc[:i]
	case 1:
		return doc[:i] + doc[i+1:]
	case 2:
		stray := "{}[],:\"\\-.e0 x"
		return doc[:i] + string(stray[r.Intn(len(stray))]) + doc[i:]
	default:
		return doc[:i] + string([]byte{byte(r.Intn(256))}) + doc[i+1:]
	}
}

func TestParseInputGenerated(t *testing.T) {
	r := rand.New(rand.NewSource(17))
	valid := 0
	for i := 0; i < 30000; i++ {
		doc := randomValue(r, 0)
		same(t, []byte(doc))
		same(t, []byte(mutate(r, doc)))
		if _, err := parseInput([]byte(doc)); err == nil {
			valid++
		}
	}
	if valid < 10000 { // the generator must mostly make documents, not errors
		t.Fatalf("only %d of 30000 generated documents are JSON", valid)
	}
	t.Logf("%d of 30000 generated documents are JSON", valid)
}

// TestParseInputDecisions decides generated inputs with a policy that reads every kind of value,
// from each parse: the decisions are the same.
func TestParseInputDecisions(t *testing.T) {
	module := `package t
import rego.v1
summary := {"kind": type_name(input), "n": count(walked), "nums": nums, "strs": strs, "keys": keys}
walked := [p | walk(input, [p, _])]
nums := sort([x | walk(input, [_, x]); is_number(x)])
strs := sort([x | walk(input, [_, x]); is_string(x)])
keys := sort([k | walk(input, [p, _]); count(p) > 0; k := p[count(p) - 1]; is_string(k)])`
	query, err := prepare("data.t.summary", map[string]string{"t.rego": module}, inmem.New())
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(7))
	for i := 0; i < 2000; i++ {
		doc := []byte(randomValue(r, 0))
		old, err1 := oldParse(doc)
		parsed, err2 := parseInput(doc)
		if (err1 != nil) != (err2 != nil) {
			t.Fatalf("%q: %v / %v", doc, err1, err2)
		}
		if err1 != nil {
			continue
		}
		a, _, errA := evaluate(query, old, deadline(1000))
		b, _, errB := evaluate(query, parsed, deadline(1000))
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		if (errA == nil) != (errB == nil) || string(ja) != string(jb) {
			t.Fatalf("%q: %s (%v) / %s (%v)", doc, ja, errA, jb, errB)
		}
	}
}

// gatewayInput is the decision input the gateway builds for a call of the built-in echo tool.
const gatewayInput = `{"version": "v2", "identity": {"agent_id": "agent-1", "subject": "alice", "groups": ["analysts"],
"scopes": [], "subject_type": "user", "principals": [{"type": "service_principal", "name": "agent-1"},
{"type": "user", "name": "alice"}, {"type": "group", "name": "analysts"}]}, "tool": {"name": "echo",
"securable": "main.tools.echo", "annotations": {"readOnlyHint": true, "idempotentHint": true,
"openWorldHint": false}, "tags": ["builtin"], "owner": "castellan", "risk": "low"}, "arguments": {"text":
"hello 1", "count": 3, "ratio": 0.25}, "context": {"time": "2026-12-01T23:00:00Z", "request_id":
"0123456789abcdef", "session": null, "budgets": {"calls": 100, "tokens": 12345678901234567890}}}`

func BenchmarkParseOld(b *testing.B) {
	doc := []byte(gatewayInput)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := oldParse(doc); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseInput(b *testing.B) {
	doc := []byte(gatewayInput)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseInput(doc); err != nil {
			b.Fatal(err)
		}
	}
}
