// Package main is OPA's own evaluator (github.com/open-policy-agent/opa v1.22.2, the version the
// project's OPA binary is built from) exported as a C shared library for the gateway's embedded
// engine (server/policy/inprocess_opa.py calls it through ctypes).
//
// Decisions are exact by construction: the same parser, compiler and topdown evaluator as
// `opa run --server`, queried as the gateway queries OPA over REST (strict builtin errors, JSON in
// with numbers kept exact, the entrypoint's value out). Three things differ, all fail-closed:
//   - builtins that reach outside the process (http.send, net.lookup_ip_addr) or describe the OPA
//     process (opa.runtime) are not in the capabilities: a policy using them does not compile here;
//   - builtins whose allocation grows with argument values are bounded (bounds.go) and halt the
//     evaluation, before allocating, past their bound;
//   - every evaluation runs under a deadline, and a Go panic is recovered and returned as an error.
package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"
	"unsafe"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/open-policy-agent/opa/v1/version"
)

var opaVersion = version.Version

// Refused are the builtins a policy may not use in-process.
var Refused = map[string]string{
	"http.send":          "makes network requests from the gateway's process",
	"net.lookup_ip_addr": "makes DNS requests from the gateway's process",
	"opa.runtime":        "describes the OPA process, which differs in-process",
	"graph.reachable_paths": "its result can grow exponentially with the graph (every path), past any bound " +
		"that could be checked before it allocates",
}

type compiled struct {
	query   rego.PreparedEvalQuery
	timeout time.Duration
}

var (
	mu       sync.RWMutex
	policies = map[int64]*compiled{}
	next     int64
)

type compileRequest struct {
	Modules   map[string]string `json:"modules"`
	Data      json.RawMessage   `json:"data"`
	Query     string            `json:"query"`
	TimeoutMs int64             `json:"timeout_ms"`
}

func capabilities() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	kept := caps.Builtins[:0]
	for _, b := range caps.Builtins {
		if _, refused := Refused[b.Name]; !refused {
			kept = append(kept, b)
		}
	}
	caps.Builtins = kept
	return caps
}

var caps = capabilities()

func reply(v any) *C.char {
	bs, err := json.Marshal(v)
	if err != nil {
		bs, _ = json.Marshal(map[string]string{"error": "cannot encode the result: " + err.Error()})
	}
	return C.CString(string(bs))
}

func failure(err error) *C.char { return reply(map[string]string{"error": err.Error()}) }

// recovered turns a panic in the calling goroutine into an error reply.
func recovered(out **C.char) {
	if r := recover(); r != nil {
		*out = failure(fmt.Errorf("panic in the policy engine: %v", r))
	}
}

//export castellan_compile
func castellan_compile(request *C.char) (out *C.char) {
	defer recovered(&out)
	var req compileRequest
	if err := json.Unmarshal([]byte(C.GoString(request)), &req); err != nil {
		return failure(err)
	}
	var data map[string]any
	if len(req.Data) > 0 {
		if err := util.UnmarshalJSON(req.Data, &data); err != nil {
			return failure(fmt.Errorf("policy data does not load: %w", err))
		}
	}
	if data == nil {
		data = map[string]any{}
	}
	options := []func(*rego.Rego){
		rego.Query(req.Query),
		rego.Store(inmem.NewFromObject(data)),
		rego.StrictBuiltinErrors(true),
		rego.Capabilities(caps),
	}
	for path, text := range req.Modules {
		options = append(options, rego.Module(path, text))
	}
	query, err := rego.New(options...).PrepareForEval(context.Background())
	if err != nil {
		return failure(err)
	}
	timeout := time.Duration(req.TimeoutMs) * time.Millisecond
	if timeout <= 0 {
		timeout = time.Second
	}
	mu.Lock()
	next++
	handle := next
	policies[handle] = &compiled{query: query, timeout: timeout}
	mu.Unlock()
	return reply(map[string]int64{"handle": handle})
}

//export castellan_eval
func castellan_eval(handle C.longlong, input *C.char, length C.int) (out *C.char) {
	defer recovered(&out)
	mu.RLock()
	policy := policies[int64(handle)]
	mu.RUnlock()
	if policy == nil {
		return failure(errors.New("no such compiled policy"))
	}
	var document any
	if err := util.UnmarshalJSON(C.GoBytes(unsafe.Pointer(input), length), &document); err != nil {
		return failure(fmt.Errorf("input is not JSON: %w", err))
	}
	value, err := ast.InterfaceToValue(document)
	if err != nil {
		return failure(err)
	}
	// A timer that cancels, rather than a context deadline: rego then starts no goroutine per query.
	cancel := topdown.NewCancel()
	timer := time.AfterFunc(policy.timeout, cancel.Cancel)
	defer timer.Stop()
	results, err := policy.query.Eval(context.Background(), rego.EvalParsedInput(value), rego.EvalExternalCancel(cancel))
	if err != nil {
		return failure(err)
	}
	if len(results) == 0 || len(results[0].Expressions) == 0 {
		return reply(map[string]any{}) // undefined
	}
	return reply(map[string]any{"result": results[0].Expressions[0].Value})
}

//export castellan_release
func castellan_release(handle C.longlong) {
	mu.Lock()
	delete(policies, int64(handle))
	mu.Unlock()
}

//export castellan_free
func castellan_free(p *C.char) { C.free(unsafe.Pointer(p)) }

func main() {}

//export castellan_limits
func castellan_limits() *C.char {
	return reply(map[string]any{
		"opa_version": opaVersion,
		"refused":     Refused,
		"bounds": map[string]any{
			"numbers.range":             fmt.Sprintf("at most %d numbers", MaxRangeNumbers),
			"numbers.range_step":        fmt.Sprintf("at most %d numbers", MaxRangeNumbers),
			"net.cidr_expand":           fmt.Sprintf("at most 2^%d addresses", MaxCIDRHostBits),
			"bits.lsh":                  fmt.Sprintf("a shift of at most %d bits", MaxShiftBits),
			"replace":                   fmt.Sprintf("a result of at most %d bytes", MaxReplacedLen),
			"strings.replace_n":         fmt.Sprintf("a result of at most %d bytes", MaxReplacedLen),
			"regex.globs_match":         fmt.Sprintf("patterns of at most %d bytes", MaxGlobPattern),
			"regex.replace":             fmt.Sprintf("a result of at most %d bytes", MaxProduced),
			"json.patch":                fmt.Sprintf("copy operations that produce at most %d bytes", MaxProduced),
			"json.marshal_with_options": fmt.Sprintf("indent and prefix that produce at most %d bytes", MaxProduced),
			"strings.render_template": fmt.Sprintf(
				"at most %d bytes by len(template) x size(vars)^(range and template actions)", MaxProduced),
		},
	})
}
