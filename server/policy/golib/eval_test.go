package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// callInput is the decision input the gateway built for a call of the built-in echo tool
// (bench.pipeline_cpu, session 9), as embedded.py sends it.
const callInput = `{"version": "v2", "identity": {"agent_id": "bench-agent", "subject": "bench-agent", "groups": ["analysts"], "scopes": [], "subject_type": "service_principal", "principals": [{"type": "service_principal", "name": "bench-agent"}, {"type": "group", "name": "analysts"}]}, "tool": {"name": "echo", "securable": "main.tools.echo", "annotations": {"readOnlyHint": true, "idempotentHint": true, "openWorldHint": false}, "upstream": null}, "action": "call", "arguments": {"text": "call 400"}, "normalized": {"arguments": {"text": "call 400"}, "strings": [["text", "call 400"]]}, "run": {"run_id": "01a2358e56617d20b227c83707e4456e", "depth": 0, "calls": 1, "repeats": 1}, "grants": {"has": ["USE CATALOG on main", "USE SCHEMA on main.tools", "EXECUTE on main.tools.echo"], "missing": []}, "budget": {"tokens_used": 7182, "tokens_limit": 0, "calls_this_minute": 400, "identical_calls": 0, "identical_calls_limit": 0, "identical_calls_window_seconds": 300, "tool_calls": 0, "tool_calls_limit": 0, "tool_calls_window_seconds": 60}, "time": "2026-12-02T07:00:50.401404Z", "detections": []}`

// projectPolicy compiles the project's default policy (policies/, as PolicyBundle loads it) with
// the decision log's mask (its system.log modules), as the gateway does: the handle.
func projectPolicy(t testing.TB, withMask bool) int64 {
	t.Helper()
	root := filepath.Join("..", "..", "..", "policies")
	modules, masks := map[string]string{}, map[string]string{}
	data := map[string]any{}
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		text, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		switch {
		case strings.HasSuffix(path, "_test.rego"):
		case strings.HasSuffix(path, ".rego"):
			modules[rel] = string(text)
			if strings.HasPrefix(rel, "system/log/") {
				masks[rel] = string(text)
			}
		case filepath.Base(path) == "data.json":
			var doc map[string]any
			if err := json.Unmarshal(text, &doc); err != nil {
				return err
			}
			node := data
			for _, part := range strings.Split(filepath.Dir(rel), string(filepath.Separator)) {
				child, _ := node[part].(map[string]any)
				if child == nil {
					child = map[string]any{}
					node[part] = child
				}
				node = child
			}
			for k, v := range doc {
				node[k] = v
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	dataJSON, _ := json.Marshal(data)
	req := compileRequest{Modules: modules, Data: dataJSON, Query: "data.castellan.gateway.decision", TimeoutMs: 1000}
	if withMask {
		req.Mask = &maskRequest{Modules: masks, Query: "data.system.log.mask", TimeoutMs: 1000}
	}
	body, _ := json.Marshal(req)
	var reply struct {
		Handle int64  `json:"handle"`
		Error  string `json:"error"`
	}
	if err := json.Unmarshal(compileCall(body), &reply); err != nil || reply.Error != "" {
		t.Fatalf("compile: %v %s", err, reply.Error)
	}
	return reply.Handle
}

// The default policy allows the echo call, with no reasons or obligations, and masks nothing.
func TestProjectPolicyEval(t *testing.T) {
	handle := projectPolicy(t, true)
	got := string(evalCall(handle, []byte(callInput)))
	want := `{"mask":[],"result":{"allow":true,"obligations":{},"reasons":[]}}`
	if got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

func benchmarkEval(b *testing.B, withMask bool) {
	handle := projectPolicy(b, withMask)
	input := []byte(callInput)
	b.ReportAllocs()
	start := processCPU()
	for b.Loop() {
		evalCall(handle, input)
	}
	b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
}

// processCPU is the process's CPU time (every thread's: the collector's too), in ns. On a shared
// machine the wall time per op mostly measures the load; this does not.
func processCPU() int64 {
	var usage syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return usage.Utime.Nano() + usage.Stime.Nano()
}

func BenchmarkEvalCall(b *testing.B)       { benchmarkEval(b, true) }
func BenchmarkEvalCallNoMask(b *testing.B) { benchmarkEval(b, false) }

// The parts of an evaluation call, apart.
func BenchmarkEvalParts(b *testing.B) {
	handle := projectPolicy(b, true)
	policy := policies[handle]
	input := []byte(callInput)
	value, _ := parseInput(input)
	result, _, _ := evaluate(policy.query, value, policy.timeout)
	run := func(name string, f func()) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			start := processCPU()
			for b.Loop() {
				f()
			}
			b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
		})
	}
	run("parse", func() { _, _ = parseInput(input) })
	run("decision", func() { _, _, _ = evaluate(policy.query, value, policy.timeout) })
	run("mask", func() { _, _ = maskOf(policy.mask, value, result) })
	run("reply", func() { replyJSON(map[string]any{"result": result, "mask": []any{}}) })
}
