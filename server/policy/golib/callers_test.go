package main

import (
	"testing"
	"time"
)

// A thread that stopped calling does not keep its state for ever: past maxCallers entries, adding
// one drops those idle for over callerIdle, and keeps the busy ones.
func TestIdleCallersAreForgotten(t *testing.T) {
	now := time.Now().UnixNano()
	for tid := 1_000_000; tid < 1_000_000+maxCallers; tid++ {
		state := new(callerState)
		state.lastCall.Store(now - 2*callerIdle)
		if tid == 1_000_000 {
			state.lastCall.Store(now) // busy
		}
		if _, loaded := callers.LoadOrStore(tid, state); !loaded {
			callerCount.Add(1)
		}
	}
	keepProcessor() // this thread is new: the idle ones go
	if n := callerCount.Load(); n > 3 {
		t.Fatalf("%d callers kept, want the busy one, this thread and any other test thread", n)
	}
	if _, ok := callers.Load(1_000_000); !ok {
		t.Fatal("the busy caller was dropped")
	}
	count := 0
	callers.Range(func(any, any) bool { count++; return true })
	if int64(count) != callerCount.Load() {
		t.Fatalf("count %d, map holds %d", callerCount.Load(), count)
	}
}
