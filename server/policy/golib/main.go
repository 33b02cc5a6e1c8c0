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
//
// A policy may be compiled with the decision log's mask (data.system.log.mask of the bundle's
// system.log modules): each evaluation then also evaluates the mask on {"input": the input,
// "result": the decision}, reusing the input already parsed, in the same call.
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
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/metrics"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
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
	mask    *compiledMask
}

// compiledMask is the decision log's mask rule, compiled from its own modules over the same data.
type compiledMask struct {
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
	Mask      *maskRequest      `json:"mask"`
}

type maskRequest struct {
	Modules   map[string]string `json:"modules"`
	Query     string            `json:"query"`
	TimeoutMs int64             `json:"timeout_ms"`
}

// gcPercent is the collector's pacing unless the process sets GOGC itself. An evaluation allocates
// ~40-70 KB and keeps nothing, over a live heap of ~1 MB for the default policy: at Go's default (100)
// the heap's 4 MB floor made a collection every ~50 decisions, ~25% of the library's CPU, spent
// mostly on the runtime's own threads. At 400 the floor is 16 MB: a quarter of the collections, for
// at most ~12 MB more heap (4x the live heap beyond it for a policy with large data).
const gcPercent = 400

func init() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}

// A call from a thread that C started runs on a P whose scheduler tick never moves (no goroutine is
// scheduled on it: the call runs on the thread's own goroutine), and between calls the thread keeps
// the P as in a system call. Go's monitor thread (sysmon) takes back a P whose tick has not moved in
// 10 ms; it then finds every P idle and sleeps, the next call wakes it to take the P back, and it
// polls every 20 µs for as long as that call runs. Measured on the default policy with a call every
// ~3.5-7 ms (the gateway at concurrency 1 runs one every ~8 ms): sysmon spent 110-250 µs of CPU per
// call, a fifth of the library's process CPU. A yield moves the tick (it parks the thread's goroutine
// and has another thread hand the P straight back: two wake-ups), so sysmon leaves the P with the
// thread, finds nothing to take back, and slows to its 10 ms idle poll: 15-25 µs per call.
//
// The yield helps only while calls come closer than sysmon's 10 ms: a thread yields when its last
// call was under callsApart ago and its last yield over yieldEvery ago. Calls further apart lose the
// P between them whatever is done in them, and a yield would only add its wake-ups.
const (
	yieldEvery = int64(5 * time.Millisecond)
	callsApart = int64(10 * time.Millisecond)
)

type callerState struct{ lastCall, lastYield atomic.Int64 }

// callers is each calling thread's state by thread id: each calling thread has its own P to keep.
// A thread that stopped calling (a worker restarted, a pool thread gone) leaves its entry behind:
// once there are more than maxCallers, adding one first drops those idle for over callerIdle.
var (
	callers     sync.Map
	callerCount atomic.Int64
)

const (
	maxCallers = 256
	callerIdle = int64(time.Minute)
)

// keepProcessor yields once when the calling thread's calls are close and it has not yielded for
// yieldEvery.
func keepProcessor() {
	tid := syscall.Gettid()
	state, ok := callers.Load(tid)
	if !ok {
		if callerCount.Load() >= maxCallers {
			forgetIdleCallers(time.Now().UnixNano())
		}
		var loaded bool
		if state, loaded = callers.LoadOrStore(tid, new(callerState)); !loaded {
			callerCount.Add(1)
		}
	}
	caller := state.(*callerState)
	now := time.Now().UnixNano()
	if now-caller.lastCall.Swap(now) < callsApart && now-caller.lastYield.Load() > yieldEvery {
		caller.lastYield.Store(now)
		runtime.Gosched()
	}
}

// forgetIdleCallers drops the state of threads whose last call is over callerIdle before now.
func forgetIdleCallers(now int64) {
	callers.Range(func(tid, state any) bool {
		if now-state.(*callerState).lastCall.Load() > callerIdle {
			if _, deleted := callers.LoadAndDelete(tid); deleted {
				callerCount.Add(-1)
			}
		}
		return true
	})
}

func prepare(query string, modules map[string]string, store storage.Store) (rego.PreparedEvalQuery, error) {
	options := []func(*rego.Rego){
		rego.Query(query),
		rego.Store(store),
		rego.StrictBuiltinErrors(true),
		rego.Capabilities(caps),
	}
	for path, text := range modules {
		options = append(options, rego.Module(path, text))
	}
	return rego.New(options...).PrepareForEval(context.Background())
}

func deadline(ms int64) time.Duration {
	if ms <= 0 {
		return time.Second
	}
	return time.Duration(ms) * time.Millisecond
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

func replyJSON(v any) []byte {
	bs, err := json.Marshal(v)
	if err != nil {
		bs, _ = json.Marshal(map[string]string{"error": "cannot encode the result: " + err.Error()})
	}
	return bs
}

func failureJSON(err error) []byte { return replyJSON(map[string]string{"error": err.Error()}) }

// cReply is a reply's JSON as a C string (malloc'd: the caller frees it with castellan_free).
func cReply(bs []byte) *C.char { return C.CString(string(bs)) }

func reply(v any) *C.char { return cReply(replyJSON(v)) }

func failure(err error) *C.char { return cReply(failureJSON(err)) }

// recovered turns a panic in the calling goroutine into an error reply.
func recovered(out **C.char) {
	if r := recover(); r != nil {
		*out = failure(fmt.Errorf("panic in the policy engine: %v", r))
	}
}

//export castellan_compile
func castellan_compile(request *C.char) (out *C.char) {
	defer recovered(&out)
	return cReply(compileCall([]byte(C.GoString(request))))
}

// compileCall compiles a compileRequest (JSON) and keeps it under a new handle: the reply's JSON.
func compileCall(request []byte) []byte {
	var req compileRequest
	if err := json.Unmarshal(request, &req); err != nil {
		return failureJSON(err)
	}
	var data map[string]any
	if len(req.Data) > 0 {
		if err := util.UnmarshalJSON(req.Data, &data); err != nil {
			return failureJSON(fmt.Errorf("policy data does not load: %w", err))
		}
	}
	if data == nil {
		data = map[string]any{}
	}
	store := inmem.NewFromObject(data) // read-only: shared by the decision and the mask
	query, err := prepare(req.Query, req.Modules, store)
	if err != nil {
		return failureJSON(err)
	}
	policy := &compiled{query: query, timeout: deadline(req.TimeoutMs)}
	if req.Mask != nil {
		mask, err := prepare(req.Mask.Query, req.Mask.Modules, store)
		if err != nil {
			return failureJSON(err)
		}
		policy.mask = &compiledMask{query: mask, timeout: deadline(req.Mask.TimeoutMs)}
	}
	mu.Lock()
	next++
	handle := next
	policies[handle] = policy
	mu.Unlock()
	return replyJSON(map[string]int64{"handle": handle})
}

//export castellan_eval
func castellan_eval(handle C.longlong, input *C.char, length C.int) (out *C.char) {
	defer recovered(&out)
	keepProcessor()
	// Parsed in place: the bytes are the caller's, valid for the call, and nothing parsed keeps them.
	return cReply(evalCall(int64(handle), unsafe.Slice((*byte)(unsafe.Pointer(input)), int(length))))
}

// evalCall evaluates the policy under `handle` on `input` (a JSON document): the reply's JSON.
func evalCall(handle int64, input []byte) []byte {
	mu.RLock()
	policy := policies[handle]
	mu.RUnlock()
	if policy == nil {
		return failureJSON(errors.New("no such compiled policy"))
	}
	value, err := parseInput(input)
	if err != nil {
		return failureJSON(fmt.Errorf("input is not JSON: %w", err))
	}
	result, defined, err := evaluate(policy.query, value, policy.timeout)
	if err != nil {
		return failureJSON(err)
	}
	if !defined {
		return replyJSON(map[string]any{}) // undefined
	}
	answer := map[string]any{"result": result}
	if policy.mask != nil {
		// The mask sees what OPA's decision logger gives it: the input and the decision's result.
		// An error in it is reported apart: the decision stands, and the gateway masks on its own.
		if mask, err := maskOf(policy.mask, value, result); err != nil {
			answer["mask_error"] = err.Error()
		} else {
			answer["mask"] = mask
		}
	}
	return replyJSON(answer)
}

// noMetrics: nothing reads an evaluation's metrics, so none are kept (rego makes a map and timers
// per evaluation otherwise).
var noMetrics = metrics.NoOp()

// evaluate runs a prepared query on a parsed input under a deadline: (value, defined, error).
func evaluate(query rego.PreparedEvalQuery, input ast.Value, timeout time.Duration) (any, bool, error) {
	// A timer that cancels, rather than a context deadline: rego then starts no goroutine per query.
	cancel := topdown.NewCancel()
	timer := time.AfterFunc(timeout, cancel.Cancel)
	defer timer.Stop()
	results, err := query.Eval(context.Background(), rego.EvalParsedInput(input), rego.EvalExternalCancel(cancel),
		rego.EvalMetrics(noMetrics))
	if err != nil {
		return nil, false, err
	}
	if len(results) == 0 || len(results[0].Expressions) == 0 {
		return nil, false, nil
	}
	return results[0].Expressions[0].Value, true, nil
}

// maskOf is the mask's value for {"input": input, "result": result}, nil when undefined.
func maskOf(mask *compiledMask, input ast.Value, result any) (any, error) {
	resultValue, err := ast.InterfaceToValue(result)
	if err != nil {
		return nil, err
	}
	event := ast.NewObject(
		ast.Item(ast.StringTerm("input"), ast.NewTerm(input)),
		ast.Item(ast.StringTerm("result"), ast.NewTerm(resultValue)),
	)
	value, _, err := evaluate(mask.query, event, mask.timeout)
	return value, err
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

// gcPercentInEffect is the collector's pacing as the runtime reports it (GOGC, or gcPercent).
func gcPercentInEffect() uint64 {
	sample := []rtmetrics.Sample{{Name: "/gc/gogc:percent"}}
	rtmetrics.Read(sample)
	if sample[0].Value.Kind() != rtmetrics.KindUint64 {
		return 0
	}
	return sample[0].Value.Uint64()
}

//export castellan_limits
func castellan_limits() *C.char {
	return reply(map[string]any{
		"opa_version": opaVersion,
		"gc_percent":  gcPercentInEffect(),
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
