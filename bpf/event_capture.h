/* Rate-capped stack capture for the event-driven profiles (wall switch-outs, lock waits),
 * and the record code both share. Include after stack_agg.h.
 *
 * An event's stack capture (user and kernel stack, stack copy, CPython frames, DWARF
 * unwinding, the stack id) is most of a program's cost, and events follow the host's rate,
 * not a frequency. So each event is captured with a probability pi known at the moment of
 * the draw, and a captured event carries the weight 1/pi (a Horvitz-Thompson weight: its
 * expectation is 1 for every event, whatever pi depended on, as long as pi > 0):
 *
 *   pi = p x q
 *   p  per thread: min(1, t x CAPTURE_RATE_HZ), t the time since the thread's last capture
 *      or, when longer, the event's own length if it is known at the draw (a lock wait is
 *      drawn when it ends): threads with fewer events than the rate, and events lasting at
 *      least 1/CAPTURE_RATE_HZ, are captured every time, so a thread's few long waits are not
 *      left stackless by the short ones before them; a thread still gets at most about
 *      CAPTURE_RATE_HZ captures a second (events that long cannot come faster);
 *   q  per CPU: min(1, budget / wanted), wanted being the sum of p over the previous
 *      BUDGET_WINDOW_NS on this CPU and budget CAPTURE_BUDGET_HZ's share of a window: about
 *      `budget` captures a window whatever the number of threads.
 *
 * Events at least 1/CAPTURE_RATE_HZ long (known at the draw) skip q: pi = 1 for them. So do
 * events the caller wants for certain (`certain`: a thread's first lock wait, or its first on a
 * lock when the waits come from the wall program), so that a thread with only a few waits is
 * not left without any stack for them.
 * A window whose demand jumps past the estimate is stopped at BUDGET_HARD_CAP captures
 * (LONG_EVENT_CAP for those certain ones): events after that are not drawn (pi = 0 for them),
 * counted as capped. That is the one place the estimate can lean (towards stacks early in a
 * window); the counter says when it happened.
 * Events that are not captured still count exactly (time, count) in a per-(thread, label)
 * sum; the agent shares those sums out over the captured stacks of the same thread and label
 * in proportion to the weights (agent/actors/aggregated.py, spread_uncaptured).
 *
 * Fixed point: p and pi in 1/2^32ths (P_ONE), q in 1/2^16ths, weights 1/pi in 1/2^16ths.
 */
#ifndef STACKFLEET_EVENT_CAPTURE_H
#define STACKFLEET_EVENT_CAPTURE_H

#define P_SHIFT 32
#define P_ONE (1ULL << P_SHIFT)
#define Q_SHIFT 16
#define Q_ONE (1ULL << Q_SHIFT)
#define WEIGHT_SHIFT 16
#define WEIGHT_ONE (1ULL << WEIGHT_SHIFT)   /* the weight of an event captured for certain */

#ifndef CAPTURE_RATE_HZ
#define CAPTURE_RATE_HZ 0           /* per thread; 0: every event is wanted */
#endif
#ifndef CAPTURE_BUDGET_HZ
#define CAPTURE_BUDGET_HZ 0         /* per CPU; 0: no budget */
#endif
/* scaled x 2^32 / 10^9 as a multiply and a shift (a 64-bit division at every event is
 * measurable): floor(2^62 / 10^9) / 2^30; below the exact p by at most 2^-32 (a p a little
 * lower is still the p drawn with and weighted by, so the weights stay unbiased). */
#define P_PER_SECOND_NS 4611686018ULL
#define P_PER_SECOND_SHIFT 30
#define BUDGET_WINDOW_NS 100000000ULL
#define BUDGET_PER_WINDOW ((CAPTURE_BUDGET_HZ * BUDGET_WINDOW_NS + 999999999ULL) / 1000000000ULL)
#define BUDGET_HARD_CAP (2 * BUDGET_PER_WINDOW)
#define LONG_EVENT_CAP (2 * BUDGET_HARD_CAP)   /* events wanted for certain (long, or `certain`) */

struct capture_budget {
    u64 window;         /* ktime / BUDGET_WINDOW_NS of the current window */
    u64 wanted;         /* sum of p this window, in 1/P_ONE ths */
    u64 taken;          /* captures this window */
    u64 q;              /* this window's factor, in 1/Q_ONE ths */
    u64 window_end;     /* (window + 1) x BUDGET_WINDOW_NS: the window index is divided out only
                           when a window ends, not at every event */
};

BPF_PERCPU_ARRAY(capture_budgets, struct capture_budget, 1);

/* This CPU's budget factor for the window containing `now`, rolling the window over. */
static __always_inline struct capture_budget *capture_window(u64 now)
{
    u32 zero = 0;
    struct capture_budget *b = capture_budgets.lookup(&zero);
    if (!b)
        return 0;
    if (now >= b->window_end) {     /* ktime only grows on a CPU: still in the window otherwise */
        u64 w = now / BUDGET_WINDOW_NS;
        u64 wanted = w == b->window + 1 ? b->wanted : 0;   /* after a gap: no estimate, q = 1 */
        u64 budget = BUDGET_PER_WINDOW << P_SHIFT;
        b->q = wanted <= budget ? Q_ONE : (budget << Q_SHIFT) / wanted;  /* budget < 2^46 */
        b->window = w;
        b->window_end = (w + 1) * BUDGET_WINDOW_NS;
        b->wanted = 0;
        b->taken = 0;
    }
    return b;
}

/* Whether to capture this event: its probability pi (1/P_ONE ths, > 0) if captured, else 0.
 * `last_capture` is the thread's last capture time (0: never), updated on capture;
 * `event_ns` the event's length when known at the draw, else 0; `certain`: with a budget, the
 * caller wants this event for certain, like a long one (a thread's first lock wait); without a
 * budget the per-thread rate alone decides. */
static __always_inline u64 capture_probability(u64 *last_capture, u64 now, u64 event_ns, int certain)
{
    u64 p = P_ONE;
    u64 last = *last_capture;
    if (CAPTURE_RATE_HZ && last && last < now) {
        u64 span = now - last > event_ns ? now - last : event_ns;
        u64 scaled = span * CAPTURE_RATE_HZ;  /* < 2^64 for gaps under ~5 days at 40 kHz */
        if (scaled < 1000000000ULL)
            p = (scaled * P_PER_SECOND_NS) >> P_PER_SECOND_SHIFT;  /* scaled < 2^30, the constant < 2^33 */
    }
    u64 pi = p;
    if (CAPTURE_BUDGET_HZ) {
        struct capture_budget *b = capture_window(now);
        if (b) {
            certain = certain || (CAPTURE_RATE_HZ && event_ns * CAPTURE_RATE_HZ >= 1000000000ULL);
            if (certain)
                p = P_ONE;  /* in the window's demand as what it is: wanted for certain */
            b->wanted += p;
            /* An event at least 1/CAPTURE_RATE_HZ long is wanted for certain by its own
             * length: it skips the factor q and has a cap of its own above the hard cap, so
             * a burst of short waits cannot leave a long one (a join, a long lock wait)
             * without its stack. So is an event the caller wants for certain (a thread's first
             * lock wait: drawn at q, a thread's only few waits on a lock could all be drawn
             * out, and their (thread, lock) stratum had no stack to be shared over, reported
             * stackless). Bounded still: at most LONG_EVENT_CAP captures a window. */
            if (b->taken >= (certain ? LONG_EVENT_CAP : BUDGET_HARD_CAP)) {
                count(AGG_CAPPED);
                return 0;
            }
            pi = certain ? P_ONE : (p * b->q) >> Q_SHIFT;     /* p <= 2^32, q <= 2^16 */
            if (!pi)
                pi = 1;
            if (pi < P_ONE && (u64)bpf_get_prandom_u32() >= pi) {
                count(AGG_SAMPLED_OUT);
                return 0;
            }
            b->taken++;
        }
    } else if (pi < P_ONE && (u64)bpf_get_prandom_u32() >= pi) {   /* no budget: the rate alone */
        count(AGG_SAMPLED_OUT);
        return 0;
    }
    *last_capture = now;
    count(AGG_CAPTURED);
    return pi;
}

/* 1/pi in 1/2^WEIGHT_SHIFT ths (pi > 0). */
static __always_inline u64 inverse_probability(u64 pi)
{
    return (1ULL << (P_SHIFT + WEIGHT_SHIFT)) / pi;
}

/* ns x inverse_p / 2^WEIGHT_SHIFT, saturating (an interval of hours captured at a tiny pi). */
static __always_inline u64 weighted_ns(u64 ns, u64 inverse_p)
{
    u64 hi = ns >> WEIGHT_SHIFT, lo = ns & (WEIGHT_ONE - 1);
    if (hi && inverse_p > (1ULL << 62) / hi)
        return 1ULL << 62;
    return hi * inverse_p + ((lo * inverse_p) >> WEIGHT_SHIFT);
}

/* Add one event of `ns` to (pid, tid, stack_id, label): captured (stack_id != 0) with weight
 * inverse_p, or not captured (stack_id 0: only its exact time and count); with the thread's
 * on-CPU time `on_cpu_ns` (started at `on_cpu_ts`) carried in the same update (wall, else 0). */
static __always_inline void record_event_carrying(u32 pid, u32 tid, u64 stack_id, u64 label, u64 ns,
                                                  u64 inverse_p, u64 ts, u64 on_cpu_ns, u64 on_cpu_ts)
{
    struct agg_key key = {.pid = pid, .tid = tid, .stack_id = stack_id, .label = label};
    if (stack_id)
        agg_add_carrying(&key, ns, weighted_ns(ns, inverse_p), inverse_p, ts, on_cpu_ns, on_cpu_ts);
    else
        agg_add_carrying(&key, ns, 0, 0, ts, on_cpu_ns, on_cpu_ts);
}

static __always_inline void record_event(u32 pid, u32 tid, u64 stack_id, u64 label, u64 ns, u64 inverse_p,
                                         u64 ts)
{
    record_event_carrying(pid, tid, stack_id, label, ns, inverse_p, ts, 0, 0);
}

/* Store a filled event's stack and add the event to its aggregate (stage 3 of a capture). */
static __always_inline void record_captured(struct stack_event *ev, u64 label, u64 ns, u64 inverse_p, u64 ts)
{
    record_event(ev->pid, ev->tid, agg_store_stack(ev), label, ns, inverse_p, ts);
}

/* The scratch event stage 1 filled, for stages 2 and 3 (bcc cannot rewrite map calls
 * inside macros, so each program writes its own two stage functions around this). */
static __always_inline struct stack_event *capture_scratch(void)
{
    u32 zero = 0;
    return agg_scratch.lookup(&zero);
}

#endif
