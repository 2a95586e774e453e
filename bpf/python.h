/* CPython frames: which Python functions a sampled thread is running.
 *
 * The agent finds CPython processes (agent/runtimes/python/process.py) and writes one py_procs
 * entry per process: the address of _PyRuntime and the struct offsets of its version
 * (agent/runtimes/python/offsets.py). At a sample this code finds the thread's PyThreadState and
 * walks its interpreter frames, recording per frame the code object's address and the
 * byte offset of the current instruction. The agent reads the code objects (name, file,
 * line table) from the live process and splices the frames into the native stack in place
 * of the interpreter's evaluation-loop frames (agent/runtimes/python/frames.py).
 *
 * Thread state: 3.11+ threads are matched by PyThreadState.native_thread_id (a walk over
 * the interpreters' thread lists, then cached per thread and re-validated at every use).
 * 3.8-3.10 have no native id: its GIL holder (gilstate.tstate_current) is used, right for
 * threads running Python code (which hold the GIL), and skipped for other threads.
 *
 * Everything is read with bpf_probe_read_user: a wrong offset or a torn read gives a
 * failed read or a bad code address, which the agent validates; it cannot fault.
 */
#ifndef STACKFLEET_PYTHON_H
#define STACKFLEET_PYTHON_H

#define PY_NONE 0xffff           /* offset not present in this version */
#define PY_MAX_THREADS 64

struct py_proc {
    u64 runtime;            /* address of _PyRuntime */
    u32 version;            /* major * 100 + minor, e.g. 311 */
    u16 rt_interp_head;     /* _PyRuntimeState.interpreters.head */
    u16 rt_tstate_current;  /* 3.8-3.10: gilstate.tstate_current */
    u16 is_next;            /* PyInterpreterState.next */
    u16 is_threads_head;    /* PyInterpreterState.threads.head (3.8-3.10: tstate_head) */
    u16 ts_next;            /* PyThreadState.next */
    u16 ts_native_tid;      /* PyThreadState.native_thread_id, PY_NONE before 3.11 */
    u16 ts_frame;           /* 3.8-3.10 frame, 3.11-3.12 cframe, 3.13+ current_frame */
    u16 cf_current_frame;   /* _PyCFrame.current_frame, PY_NONE from 3.13 */
    u16 fr_code;            /* f_code (3.13: f_executable) */
    u16 fr_previous;        /* previous (3.8-3.10: f_back) */
    u16 fr_instr;           /* prev_instr (3.13: instr_ptr; 3.8-3.10: int f_lasti) */
    u16 fr_marker;          /* byte telling call boundaries: 3.11 is_entry, 3.12+ owner */
    u16 _pad[3];
};

BPF_HASH(py_procs, u32, struct py_proc, 4096);
/* tid -> its PyThreadState, so the thread-list walk happens once per thread. */
BPF_TABLE("lru_hash", u32, u64, py_threads, 16384);

static __always_inline u64 py_read_ptr(u64 base, u16 offset)
{
    u64 value = 0;
    if (offset == PY_NONE || bpf_probe_read_user(&value, sizeof(value), (void *)(base + offset)) != 0)
        return 0;
    return value;
}

static __always_inline u64 py_find_thread(struct py_proc *proc, u32 tid)
{
    if (proc->version < 311)
        return py_read_ptr(proc->runtime, proc->rt_tstate_current);
    u64 *cached = py_threads.lookup(&tid);
    if (cached && *cached && py_read_ptr(*cached, proc->ts_native_tid) == tid)
        return *cached;
    u64 interp = py_read_ptr(proc->runtime, proc->rt_interp_head);
    u64 tstate = py_read_ptr(interp, proc->is_threads_head);
    u16 native_tid = proc->ts_native_tid, next = proc->ts_next;
    /* Only the main interpreter: subinterpreters are rare and each would multiply this loop. */
    for (int j = 0; j < PY_MAX_THREADS; j++) {
        if (!tstate)
            return 0;
        if (py_read_ptr(tstate, native_tid) == tid) {
            py_threads.update(&tid, &tstate);
            return tstate;
        }
        tstate = py_read_ptr(tstate, next);
    }
    return 0;
}

/* The frames of the current thread, collected before the event is reserved: the CPU
 * program does this in its own BPF program (a tail call away from the one that unwinds
 * native stacks), which keeps each under the verifier's limits. */
/* Bytes of an interpreter frame read at once: every supported version's frame fields lie
 * in its first 112 (3.9's f_lasti at 104). One read per frame instead of four: each
 * bpf_probe_read_user has a fixed cost that dominated the walk (docs/design/overhead.md). */
#define PY_FRAME_SPAN 128

struct py_scratch {
    u64 pid_tgid;
    u32 count;
    s32 status;
    struct py_frame py[PY_MAX_FRAMES];
    u8 frame_bytes[PY_FRAME_SPAN + 8];  /* one frame's fields; +8: masked offsets stay inside */
};
BPF_PERCPU_ARRAY(py_scratch, struct py_scratch, 1);

static __always_inline void collect_python_frames(struct py_scratch *out, u64 pid_tgid)
{
    out->pid_tgid = pid_tgid;
    out->count = 0;
    out->status = PY_STATUS_NOT_PYTHON;
    u32 pid = pid_tgid >> 32;
    struct py_proc *proc = py_procs.lookup(&pid);
    if (!proc)
        return;
    u64 tstate = py_find_thread(proc, (u32)pid_tgid);
    if (!tstate) {
        out->status = PY_STATUS_NO_THREAD;
        return;
    }
    u64 frame = py_read_ptr(tstate, proc->ts_frame);
    if (proc->cf_current_frame != PY_NONE)
        frame = py_read_ptr(frame, proc->cf_current_frame);
    u32 fr_code = proc->fr_code, fr_instr = proc->fr_instr, fr_previous = proc->fr_previous;
    u32 fr_marker = proc->fr_marker;
    /* The bytes of a frame that hold its fields, read once per frame. Offsets beyond
     * PY_FRAME_SPAN (no supported version has them) give no frames, flagged truncated. */
    u32 span = fr_code + 8;
    if (fr_instr + 8 > span)
        span = fr_instr + 8;
    if (fr_previous + 8 > span)
        span = fr_previous + 8;
    if (fr_marker + 1 > span)
        span = fr_marker + 1;
    if (span > PY_FRAME_SPAN) {
        out->status = PY_STATUS_TRUNCATED;
        return;
    }
    fr_code &= PY_FRAME_SPAN - 1;
    fr_instr &= PY_FRAME_SPAN - 1;
    fr_previous &= PY_FRAME_SPAN - 1;
    fr_marker &= PY_FRAME_SPAN - 1;
    u8 *bytes = out->frame_bytes;
    /* Branch-free body: version differences (what instr and marker mean) are the agent's
     * to interpret; every branch here would multiply the verifier's work per iteration. A
     * frame whose bytes cannot be read is recorded as zeros and ends the walk. */
    u32 n = 0;
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (!frame)
            break;
        struct py_frame *slot = &out->py[i];
        if (bpf_probe_read_user(bytes, span & (2 * PY_FRAME_SPAN - 1), (void *)frame) != 0)
            __builtin_memset(bytes, 0, PY_FRAME_SPAN);
        slot->code = *(u64 *)(bytes + fr_code);
        slot->instr = *(u64 *)(bytes + fr_instr);
        slot->marker = *(u8 *)(bytes + fr_marker);
        frame = *(u64 *)(bytes + fr_previous);
        n = i + 1;
    }
    out->count = n;
    out->status = frame ? PY_STATUS_TRUNCATED : PY_STATUS_OK;
}

/* Stage 1 of a program that takes its stacks in a tail call (cpu, heap): the thread's
 * frames into the per-CPU scratch now, for stage 2's python_frames_to_event (the two
 * stages run on one CPU, back to back). Stage 1 then makes the tail call itself. */
static __always_inline void collect_python_frames_for_tail_call(u64 pid_tgid)
{
    int zero = 0;
    struct py_scratch *scratch = py_scratch.lookup(&zero);
    if (scratch)
        collect_python_frames(scratch, pid_tgid);
}

/* Copy the scratch frames into the event (collecting them first unless the program did). */
static __always_inline void python_frames_to_event(struct stack_event *ev, u64 pid_tgid)
{
    int zero = 0;
    struct py_scratch *scratch = py_scratch.lookup(&zero);
    ev->py_count = 0;
    ev->py_status = PY_STATUS_NOT_PYTHON;
    if (!scratch)
        return;
#ifndef PYTHON_FRAMES_COLLECTED
    collect_python_frames(scratch, pid_tgid);
#endif
    if (scratch->pid_tgid != pid_tgid)
        return;
    ev->py_status = scratch->status;
    u32 n = scratch->count;
    if (n > PY_MAX_FRAMES)
        n = PY_MAX_FRAMES;
    if (n) {
        /* The frames read, not the whole array: readers stop at py_count. */
        bpf_probe_read_kernel(ev->py, n * sizeof(struct py_frame), scratch->py);
        ev->py_count = n;
    }
}

#endif
