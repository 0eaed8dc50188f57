/*
 * shm._atomics: lock-free atomic operations on 8-byte words of a shared buffer.
 *
 * Workers share control state (counters, rate limiters, latency estimates)
 * through one POSIX shared-memory segment.  Every mutation here is a single
 * __atomic_* builtin or a compare-and-swap loop on ONE aligned 8-byte word, so
 * a worker killed at any instant (SIGKILL included) can never leave a cell
 * locked or torn: the word holds either the old value or the new one.
 *
 * Cell layouts (byte offsets relative to the `offset` argument; every cell must
 * start 8-byte aligned in memory and lie wholly inside the buffer):
 *
 *   int64 word      8 bytes   bytes 0-7   native-endian two's-complement int64
 *   float64 word    8 bytes   bytes 0-7   native-endian IEEE-754 binary64
 *   GCRA cell       8 bytes   bytes 0-7   int64 theoretical arrival time (TAT)
 *                                         in ns, on the same clock as now_ns;
 *                                         zero (fresh segment) = idle bucket
 *   EWMA cell      16 bytes   bytes 0-7   word 0, as a 64-bit integer:
 *                                           bits  0-31  mean, IEEE binary32
 *                                           bits 32-63  variance, IEEE binary32
 *                                           all 64 bits zero = empty cell
 *                             bytes 8-15  word 1: int64 count of updates
 *
 * Why the EWMA packs two float32 into one word: mean and variance must change
 * together, and a single-word CAS does that without a lock; float32's 24-bit
 * mantissa is plenty for latencies and rates.  The count is bumped after the
 * CAS succeeds, so a worker killed between the two loses one count, nothing
 * more.  An update whose result is mean +0.0 and variance +0.0 would look
 * empty, so it is stored with variance -0.0; readers get +0.0 back.
 *
 * Every entry point parses all its arguments first (which may run Python code
 * through __index__ or __float__, and so could call release()), then checks
 * release, bounds and alignment, and only then touches memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define WORD_SIZE 8
#define MAX_PARAMS 7

/* ------------------------------------------------------------------------ */
/* Argument parsing                                                          */
/* ------------------------------------------------------------------------ */

typedef union {
    int64_t i;
    double f;
} Arg;

/* How one method takes its arguments and how much memory it touches. */
typedef struct {
    const char *name;
    const char *kinds;        /* one char per parameter: 'i' int64, 'f' float, 'k' mux tag */
    const char *const *names; /* parameter names, so keywords work too */
    Py_ssize_t count;
    Py_ssize_t required;      /* leading parameters that have no default */
    Py_ssize_t words;         /* 8-byte words touched at `offset` */
} Signature;

static Py_ssize_t
find_param(const Signature *sig, PyObject *key)
{
    for (Py_ssize_t i = 0; i < sig->count; i++) {
        if (PyUnicode_CompareWithASCIIString(key, sig->names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

static int
collect_keywords(const Signature *sig, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames, PyObject **objs)
{
    Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = find_param(sig, key);
        if (i < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         sig->name, key);
            return -1;
        }
        if (objs[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         sig->name, sig->names[i]);
            return -1;
        }
        objs[i] = args[nargs + k];
    }
    return 0;
}

static int
collect_args(const Signature *sig, PyObject *const *args, Py_ssize_t nargs,
             PyObject *kwnames, PyObject **objs)
{
    if (nargs > sig->count) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)",
                     sig->name, sig->count, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        objs[i] = args[i];
    }
    if (kwnames != NULL && collect_keywords(sig, args, nargs, kwnames, objs) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < sig->required; i++) {
        if (objs[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'",
                         sig->name, sig->names[i]);
            return -1;
        }
    }
    return 0;
}

/* An int argument as int64. PyLong_AsLong, not PyLong_AsLongLong: on CPython 3.11 the
 * latter takes a slow generic path for any int past 2**30 (every nanosecond clock
 * reading), the former a short loop; long is 64 bits on every platform this builds on. */
_Static_assert(sizeof(long) == sizeof(int64_t), "long must be 64 bits");

static inline int64_t
as_i64(PyObject *obj)
{
    return PyLong_AsLong(obj);
}

static int64_t mux_tag_of(PyObject *key);

static int
convert_arg(char kind, PyObject *obj, Arg *out)
{
    if (kind == 'k' && !PyLong_Check(obj)) {
        /* A multiplexer tag given as the key's bytes: hashed here (mux_tag). */
        out->i = mux_tag_of(obj);
        return (out->i == 0 && PyErr_Occurred()) ? -1 : 0;
    }
    if (kind == 'i' || kind == 'k') {
        /* Accepts int and __index__ types only: a float offset is a TypeError. */
        out->i = as_i64(obj);
        return (out->i == -1 && PyErr_Occurred()) ? -1 : 0;
    }
    out->f = PyFloat_AsDouble(obj);
    return (out->f == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* Fills out[i] for each argument given; absent optional ones keep the
 * caller's default. */
static int
parse_args(const Signature *sig, PyObject *const *args, Py_ssize_t nargs,
           PyObject *kwnames, Arg *out)
{
    PyObject *objs[MAX_PARAMS] = {NULL};
    if (collect_args(sig, args, nargs, kwnames, objs) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < sig->count; i++) {
        if (objs[i] != NULL && convert_arg(sig->kinds[i], objs[i], &out[i]) < 0) {
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The Atomics object                                                        */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* held from construction until release()/dealloc */
    int exported;   /* 0 once released: view is gone, memory must not be touched */
} AtomicsObject;

static int64_t *
word_at(AtomicsObject *self, int64_t offset, Py_ssize_t words)
{
    if (!self->exported) {
        PyErr_SetString(PyExc_ValueError, "operation on a released Atomics");
        return NULL;
    }
    /* len - 8*words cannot overflow (len >= 0) and offset is compared before
     * any addition, so a huge offset cannot wrap around into range. */
    if (offset < 0 || offset > (int64_t)self->view.len - WORD_SIZE * (int64_t)words) {
        PyErr_Format(PyExc_IndexError,
                     "offset %lld out of range for a %zd-byte cell in a %zd-byte buffer",
                     (long long)offset, WORD_SIZE * words, self->view.len);
        return NULL;
    }
    char *address = (char *)self->view.buf + offset;
    if ((uintptr_t)address % WORD_SIZE != 0) {
        PyErr_Format(PyExc_ValueError, "offset %lld is not 8-byte aligned in memory",
                     (long long)offset);
        return NULL;
    }
    return (int64_t *)(void *)address;
}

/* Parses a method's arguments (offset first) and returns its checked cell. */
static int64_t *
parse_cell(AtomicsObject *self, const Signature *sig, PyObject *const *args,
           Py_ssize_t nargs, PyObject *kwnames, Arg *out)
{
    if (parse_args(sig, args, nargs, kwnames, out) < 0) {
        return NULL;
    }
    return word_at(self, out[0].i, sig->words);
}

static PyObject *
Atomics_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", NULL};
    PyObject *buffer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Atomics", kwlist, &buffer)) {
        return NULL;
    }
    AtomicsObject *self = (AtomicsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->exported = 1;
    return (PyObject *)self;
}

static void
drop_export(AtomicsObject *self)
{
    if (self->exported) {
        /* Cleared first: releasing may finalize the exporter, which may call back in. */
        self->exported = 0;
        PyBuffer_Release(&self->view);
    }
}

static void
Atomics_dealloc(AtomicsObject *self)
{
    drop_export(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Atomics_length(AtomicsObject *self)
{
    if (!self->exported) {
        PyErr_SetString(PyExc_ValueError, "operation on a released Atomics");
        return -1;
    }
    return self->view.len;
}

static PyObject *
Atomics_release(AtomicsObject *self, PyObject *Py_UNUSED(ignored))
{
    drop_export(self);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* int64 words                                                               */
/* ------------------------------------------------------------------------ */

static const char *const P_OFFSET[] = {"offset"};
static const char *const P_VALUE[] = {"offset", "value"};
static const char *const P_DELTA[] = {"offset", "delta"};
static const char *const P_CAS[] = {"offset", "expected", "new"};

static const Signature SIG_LOAD_I64 = {"load_i64", "i", P_OFFSET, 1, 1, 1};
static const Signature SIG_STORE_I64 = {"store_i64", "ii", P_VALUE, 2, 2, 1};
static const Signature SIG_ADD_I64 = {"add_i64", "ii", P_DELTA, 2, 2, 1};
static const Signature SIG_ADD_I64_CLOCK = {"add_i64_clock", "ii", P_DELTA, 2, 2, 1};
static const Signature SIG_CAS_I64 = {"cas_i64", "iii", P_CAS, 3, 3, 1};
static const Signature SIG_MAX_I64 = {"max_i64", "ii", P_VALUE, 2, 2, 1};

static PyObject *
Atomics_load_i64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    Arg a[1];
    int64_t *cell = parse_cell(self, &SIG_LOAD_I64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    return PyLong_FromLongLong(__atomic_load_n(cell, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_store_i64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_STORE_I64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    __atomic_store_n(cell, a[1].i, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_add_i64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_ADD_I64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    /* Wraps modulo 2**64 like the hardware does; counters never get there. */
    return PyLong_FromLongLong(__atomic_fetch_add(cell, a[1].i, __ATOMIC_SEQ_CST));
}

/* add_i64, returning the CLOCK_MONOTONIC time (time.monotonic_ns's clock) after the
 * add instead: an event counted and timestamped in one call (WorkerSlot.enter). */
static PyObject *
Atomics_add_i64_clock(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_ADD_I64_CLOCK, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    __atomic_fetch_add(cell, a[1].i, __ATOMIC_SEQ_CST);
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong((int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
}

static PyObject *
Atomics_cas_i64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    Arg a[3];
    int64_t *cell = parse_cell(self, &SIG_CAS_I64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    int64_t expected = a[1].i;
    return PyBool_FromLong(__atomic_compare_exchange_n(
        cell, &expected, a[2].i, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_max_i64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_MAX_I64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    int64_t current = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    /* A failed CAS reloads `current`; stop once someone stored >= value. */
    while (current < a[1].i &&
           !__atomic_compare_exchange_n(cell, &current, a[1].i, 1, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE)) {
    }
    return PyLong_FromLongLong(current);
}

/* ------------------------------------------------------------------------ */
/* float64 words (stored as their bit pattern)                               */
/* ------------------------------------------------------------------------ */

static const Signature SIG_LOAD_F64 = {"load_f64", "i", P_OFFSET, 1, 1, 1};
static const Signature SIG_STORE_F64 = {"store_f64", "if", P_VALUE, 2, 2, 1};
static const Signature SIG_ADD_F64 = {"add_f64", "if", P_DELTA, 2, 2, 1};
static const Signature SIG_CAS_F64 = {"cas_f64", "iff", P_CAS, 3, 3, 1};

static int64_t
f64_bits(double value)
{
    int64_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static double
f64_value(int64_t bits)
{
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static PyObject *
Atomics_load_f64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    Arg a[1];
    int64_t *cell = parse_cell(self, &SIG_LOAD_F64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    return PyFloat_FromDouble(f64_value(__atomic_load_n(cell, __ATOMIC_SEQ_CST)));
}

static PyObject *
Atomics_store_f64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_STORE_F64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    __atomic_store_n(cell, f64_bits(a[1].f), __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_add_f64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_ADD_F64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    int64_t old = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    while (!__atomic_compare_exchange_n(cell, &old, f64_bits(f64_value(old) + a[1].f), 1,
                                        __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
    }
    return PyFloat_FromDouble(f64_value(old));
}

static PyObject *
Atomics_cas_f64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    Arg a[3];
    int64_t *cell = parse_cell(self, &SIG_CAS_F64, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    /* Bit patterns, not ==: -0.0 and 0.0 differ, and a NaN can be swapped out. */
    int64_t expected = f64_bits(a[1].f);
    return PyBool_FromLong(__atomic_compare_exchange_n(
        cell, &expected, f64_bits(a[2].f), 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
}

/* ------------------------------------------------------------------------ */
/* GCRA rate limiter: one int64 TAT word                                     */
/* ------------------------------------------------------------------------ */

static const char *const P_GCRA[] = {"offset", "now_ns", "interval_ns", "capacity_ns", "cost"};
static const char *const P_REFUND[] = {"offset", "amount_ns"};

static const Signature SIG_GCRA_ACQUIRE = {"gcra_acquire", "iiiii", P_GCRA, 5, 4, 1};
static const Signature SIG_GCRA_REFUND = {"gcra_refund", "ii", P_REFUND, 2, 2, 1};
static const Signature SIG_GCRA_PEEK = {"gcra_peek", "iiii", P_GCRA, 4, 4, 1};

static int
check_gcra_limits(int64_t interval_ns, int64_t capacity_ns)
{
    if (interval_ns <= 0 || capacity_ns <= 0) {
        PyErr_SetString(PyExc_ValueError, "interval_ns and capacity_ns must be > 0");
        return -1;
    }
    return 0;
}

static int
gcra_cost_ns(int64_t interval_ns, int64_t capacity_ns, int64_t cost, int64_t *cost_ns)
{
    if (check_gcra_limits(interval_ns, capacity_ns) < 0) {
        return -1;
    }
    if (cost < 0) {
        PyErr_SetString(PyExc_ValueError, "cost must be >= 0");
        return -1;
    }
    if (__builtin_mul_overflow(interval_ns, cost, cost_ns)) {
        PyErr_SetString(PyExc_OverflowError, "interval_ns * cost does not fit in int64");
        return -1;
    }
    return 0;
}

/* One GCRA decision on a TAT value: the TAT to store if admitted, and the ns
 * to wait (> 0 means refused).  Returns -1 on int64 overflow. */
static int
gcra_decide(int64_t tat, int64_t now_ns, int64_t cost_ns, int64_t capacity_ns,
            int64_t *new_tat, int64_t *wait_ns)
{
    int64_t ahead; /* how far the charged TAT would run ahead of now */
    if (__builtin_add_overflow(tat > now_ns ? tat : now_ns, cost_ns, new_tat) ||
        __builtin_sub_overflow(*new_tat, now_ns, &ahead)) {
        PyErr_SetString(PyExc_OverflowError, "GCRA arithmetic overflows int64");
        return -1;
    }
    *wait_ns = ahead > capacity_ns ? ahead - capacity_ns : 0;
    return 0;
}

static PyObject *
Atomics_gcra_acquire(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    Arg a[5] = {{0}, {0}, {0}, {0}, {.i = 1}};
    int64_t cost_ns, new_tat, wait_ns;
    int64_t *cell = parse_cell(self, &SIG_GCRA_ACQUIRE, args, nargs, kwnames, a);
    if (cell == NULL || gcra_cost_ns(a[2].i, a[3].i, a[4].i, &cost_ns) < 0) {
        return NULL;
    }
    int64_t tat = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    for (;;) {
        if (gcra_decide(tat, a[1].i, cost_ns, a[3].i, &new_tat, &wait_ns) < 0) {
            return NULL;
        }
        /* A refusal charges nothing, so concurrent refusals cannot starve admits. */
        if (wait_ns > 0) {
            return PyLong_FromLongLong(wait_ns);
        }
        if (new_tat == tat || __atomic_compare_exchange_n(cell, &tat, new_tat, 1,
                                                          __ATOMIC_SEQ_CST,
                                                          __ATOMIC_ACQUIRE)) {
            return PyLong_FromLong(0);
        }
    }
}

static PyObject *
Atomics_gcra_refund(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    Arg a[2];
    int64_t *cell = parse_cell(self, &SIG_GCRA_REFUND, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    if (a[1].i < 0) {
        PyErr_SetString(PyExc_ValueError, "amount_ns must be >= 0");
        return NULL;
    }
    __atomic_fetch_sub(cell, a[1].i, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_gcra_peek(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames)
{
    Arg a[4];
    int64_t *cell = parse_cell(self, &SIG_GCRA_PEEK, args, nargs, kwnames, a);
    if (cell == NULL || check_gcra_limits(a[2].i, a[3].i) < 0) {
        return NULL;
    }
    int64_t tat = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    int64_t now_ns = a[1].i, capacity_ns = a[3].i, used;
    if (tat <= now_ns) {
        return PyLong_FromLongLong(capacity_ns);
    }
    /* tat - now only overflows when it is huge, i.e. the bucket is full. */
    if (__builtin_sub_overflow(tat, now_ns, &used) || used >= capacity_ns) {
        return PyLong_FromLong(0);
    }
    return PyLong_FromLongLong(capacity_ns - used);
}

/* ------------------------------------------------------------------------ */
/* EWMA: word 0 = float32 mean | float32 variance << 32, word 1 = count      */
/* ------------------------------------------------------------------------ */

static const char *const P_EWMA[] = {"offset", "sample", "alpha"};

static const Signature SIG_EWMA_UPDATE = {"ewma_update", "iff", P_EWMA, 3, 3, 2};
static const Signature SIG_EWMA_READ = {"ewma_read", "i", P_OFFSET, 1, 1, 2};

static uint32_t
f32_bits(double value)
{
    /* Saturate so a huge variance stays finite instead of becoming inf. */
    float narrow = (float)fmax(-FLT_MAX, fmin(FLT_MAX, value));
    uint32_t bits;
    memcpy(&bits, &narrow, sizeof bits);
    return bits;
}

static double
f32_value(uint32_t bits)
{
    float narrow;
    memcpy(&narrow, &bits, sizeof narrow);
    return narrow;
}

static uint64_t
ewma_pack(double mean, double var)
{
    uint64_t word = (uint64_t)f32_bits(mean) | (uint64_t)f32_bits(var) << 32;
    /* All-zero bits mean "empty"; -0.0 variance keeps a real zero state apart. */
    return word != 0 ? word : (uint64_t)f32_bits(-0.0) << 32;
}

static uint64_t
ewma_next(uint64_t word, double sample, double alpha)
{
    if (word == 0) {
        return ewma_pack(sample, 0.0);
    }
    double mean = f32_value((uint32_t)word);
    double var = f32_value((uint32_t)(word >> 32));
    /* West's incremental EWMA variance. */
    double diff = sample - mean;
    double incr = alpha * diff;
    return ewma_pack(mean + incr, (1.0 - alpha) * (var + diff * incr));
}

/* Builds the tuple by hand: Py_BuildValue's format parsing doubled the cost
 * of ewma_read. */
static PyObject *
ewma_tuple(uint64_t word)
{
    PyObject *tuple = PyTuple_New(2);
    if (tuple == NULL) {
        return NULL;
    }
    PyObject *mean = PyFloat_FromDouble(f32_value((uint32_t)word));
    /* + 0.0 turns the -0.0 "non-empty zero" marker back into 0.0. */
    PyObject *var = PyFloat_FromDouble(f32_value((uint32_t)(word >> 32)) + 0.0);
    if (mean == NULL || var == NULL) {
        Py_XDECREF(mean);
        Py_XDECREF(var);
        Py_DECREF(tuple);
        return NULL;
    }
    PyTuple_SET_ITEM(tuple, 0, mean);
    PyTuple_SET_ITEM(tuple, 1, var);
    return tuple;
}

static int
check_ewma_args(double sample, double alpha)
{
    if (!(alpha > 0.0 && alpha <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "alpha must be in (0, 1]");
        return -1;
    }
    if (!(fabs(sample) <= FLT_MAX)) {
        PyErr_SetString(PyExc_ValueError, "sample must be finite and within float32 range");
        return -1;
    }
    return 0;
}

static PyObject *
Atomics_ewma_update(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    Arg a[3];
    int64_t *cell = parse_cell(self, &SIG_EWMA_UPDATE, args, nargs, kwnames, a);
    if (cell == NULL || check_ewma_args(a[1].f, a[2].f) < 0) {
        return NULL;
    }
    uint64_t *stats = (uint64_t *)cell;
    uint64_t old = __atomic_load_n(stats, __ATOMIC_ACQUIRE), new;
    do {
        new = ewma_next(old, a[1].f, a[2].f);
    } while (!__atomic_compare_exchange_n(stats, &old, new, 1, __ATOMIC_SEQ_CST,
                                          __ATOMIC_ACQUIRE));
    __atomic_fetch_add(cell + 1, 1, __ATOMIC_SEQ_CST);
    return ewma_tuple(new);
}

static PyObject *
Atomics_ewma_read(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames)
{
    Arg a[1];
    int64_t *cell = parse_cell(self, &SIG_EWMA_READ, args, nargs, kwnames, a);
    if (cell == NULL) {
        return NULL;
    }
    return ewma_tuple(__atomic_load_n((uint64_t *)cell, __ATOMIC_SEQ_CST));
}

/* ------------------------------------------------------------------------ */
/* --- observability ---                                                     */
/* Batched updates: one call does every add a finished request makes, so a   */
/* request pays one Python->C transition per kind of update, not one per word.*/
/* Every offset is parsed and checked before any word changes: a bad offset   */
/* raises and leaves the buffer untouched.                                    */
/* ------------------------------------------------------------------------ */

#define MAX_BATCH 32

/* Checks `count` offsets at args[0], args[stride], ... (cells of `words` words). */
static int
batch_cells(AtomicsObject *self, const char *name, PyObject *const *args, Py_ssize_t count,
            Py_ssize_t stride, Py_ssize_t words, int64_t **cells)
{
    if (count > MAX_BATCH) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d cells (%zd given)", name,
                     MAX_BATCH, count);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t offset = as_i64(args[i * stride]);
        if (offset == -1 && PyErr_Occurred()) {
            return -1;
        }
        cells[i] = word_at(self, offset, words);
        if (cells[i] == NULL) {
            return -1;
        }
    }
    return 0;
}

static PyObject *
Atomics_add_ones(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t *cells[MAX_BATCH];
    if (batch_cells(self, "add_ones", args, nargs, 1, 1, cells) < 0) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        __atomic_fetch_add(cells[i], 1, __ATOMIC_SEQ_CST);
    }
    Py_RETURN_NONE;
}

/* Parses (offset, delta) pairs: the deltas into `deltas` as kind 'i' or 'f'. */
static Py_ssize_t
batch_pairs(AtomicsObject *self, const char *name, char kind, PyObject *const *args,
            Py_ssize_t nargs, int64_t **cells, Arg *deltas)
{
    if (nargs % 2 != 0) {
        PyErr_Format(PyExc_TypeError, "%s() takes (offset, delta) pairs", name);
        return -1;
    }
    Py_ssize_t count = nargs / 2;
    if (batch_cells(self, name, args, count, 2, 1, cells) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (convert_arg(kind, args[2 * i + 1], &deltas[i]) < 0) {
            return -1;
        }
    }
    return count;
}

static PyObject *
Atomics_add_i64s(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t *cells[MAX_BATCH];
    Arg deltas[MAX_BATCH];
    Py_ssize_t count = batch_pairs(self, "add_i64s", 'i', args, nargs, cells, deltas);
    if (count < 0) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        __atomic_fetch_add(cells[i], deltas[i].i, __ATOMIC_SEQ_CST);
    }
    Py_RETURN_NONE;
}

static void
add_f64_at(int64_t *cell, double delta)
{
    int64_t old = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    while (!__atomic_compare_exchange_n(cell, &old, f64_bits(f64_value(old) + delta), 1,
                                        __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
    }
}

static PyObject *
Atomics_add_f64s(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t *cells[MAX_BATCH];
    Arg deltas[MAX_BATCH];
    Py_ssize_t count = batch_pairs(self, "add_f64s", 'f', args, nargs, cells, deltas);
    if (count < 0) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        add_f64_at(cells[i], deltas[i].f);
    }
    Py_RETURN_NONE;
}

/* bisect.bisect_left over a tuple of floats: the first index whose bound is >= value
 * (a NaN lands in bucket 0, as bisect puts it). */
static Py_ssize_t
bucket_of(PyObject *bounds, double value)
{
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(bounds);
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(bounds, mid)) < value) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* observe(bounds, value, *offsets): one sample into every histogram at `offsets`
 * (shm.Histogram layout for `bounds`: n bucket words, +Inf word, float64 sum). */
static PyObject *
Atomics_observe(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "observe() takes bounds, value and offsets");
        return NULL;
    }
    PyObject *bounds = args[0];
    if (!PyTuple_CheckExact(bounds)) {
        PyErr_SetString(PyExc_TypeError, "observe() bounds must be a tuple of floats");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyFloat_CheckExact(PyTuple_GET_ITEM(bounds, i))) {
            PyErr_SetString(PyExc_TypeError, "observe() bounds must be a tuple of floats");
            return NULL;
        }
    }
    Arg value;
    if (convert_arg('f', args[1], &value) < 0) {
        return NULL;
    }
    int64_t *cells[MAX_BATCH];
    if (batch_cells(self, "observe", args + 2, nargs - 2, 1, n + 2, cells) < 0) {
        return NULL;
    }
    Py_ssize_t bucket = bucket_of(bounds, value.f);
    for (Py_ssize_t i = 0; i < nargs - 2; i++) {
        __atomic_fetch_add(cells[i] + bucket, 1, __ATOMIC_SEQ_CST);
        add_f64_at(cells[i] + n + 1, value.f);
    }
    Py_RETURN_NONE;
}

/* The values one finished request records (record_request's arguments, parsed). */
typedef struct {
    int64_t status, in_delta, out_delta;
    double value, cost, second;
    int has_second;
} Finished;

/* A request plan's two bytes objects, words (llmkit.metrics.pack_plan) and statuses
 * (status_table), made once per kind of request and turned into a RequestPlan by
 * Atomics.plan (below), so recording converts and checks no Python objects.
 * Native-endian 8-byte words:
 *
 *   words     0 n_ones  1 n_hists  2 n_io  3 n_costs  4 n_bounds  5 n_bounds2 (each
 *             0..MAX_BATCH)  6 second_hist (offset)  7 class_base (offset)
 *             8 price_in  9 price_out  10 price_cached (float64, USD per million
 *             tokens)  11 has_cached_price (0/1)
 *             12.. ones[n_ones]  hists[n_hists]  io[n_io]  costs[n_costs] (offsets)
 *             bounds[n_bounds]  bounds2[n_bounds2] (float64, ascending)
 *   statuses  int64[2n]: [s] the offset that gains 1 for status s, [n + s] the word
 *             (from class_base) that does; s clamped to 0..n-1
 *
 * ones gain 1; `value` is observed into each histogram in hists (shm.Histogram layout
 * for bounds), `second` (when given) into second_hist (for bounds2); io words are
 * (in, out, in, out ...) and gain in_delta / out_delta; cost words (float64) gain
 * the cost. */
#define PLAN_HEAD 12

typedef struct {
    int64_t n_ones, n_hists, n_io, n_costs, n_bounds, n_bounds2, second_hist, class_base;
    double price_in, price_out, price_cached;
    int64_t has_cached_price;
} PlanHead;

typedef struct {
    PlanHead head;
    const int64_t *ones, *hists, *io, *costs, *statuses;
    const double *bounds, *bounds2;
    Py_ssize_t n_statuses;
} Plan;

static int
read_plan(PyObject *words, PyObject *statuses, Plan *plan)
{
    if (!PyBytes_CheckExact(words) || !PyBytes_CheckExact(statuses)) {
        PyErr_SetString(PyExc_TypeError, "plan() takes words and statuses, both bytes");
        return -1;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(words), n_statuses = PyBytes_GET_SIZE(statuses) / 16;
    const int64_t *w = (const int64_t *)PyBytes_AS_STRING(words);
    if (size < PLAN_HEAD * WORD_SIZE || n_statuses < 1 ||
        PyBytes_GET_SIZE(statuses) != 16 * n_statuses) {
        PyErr_SetString(PyExc_ValueError, "malformed plan");
        return -1;
    }
    memcpy(&plan->head, w, sizeof(PlanHead));
    const PlanHead *h = &plan->head;
    int64_t counts[6] = {h->n_ones, h->n_hists, h->n_io, h->n_costs, h->n_bounds, h->n_bounds2};
    int64_t total = PLAN_HEAD;
    for (int i = 0; i < 6; i++) {
        if (counts[i] < 0 || counts[i] > MAX_BATCH) {
            PyErr_SetString(PyExc_ValueError, "malformed plan");
            return -1;
        }
        total += counts[i];
    }
    if (size != total * WORD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "malformed plan");
        return -1;
    }
    plan->ones = w + PLAN_HEAD;
    plan->hists = plan->ones + h->n_ones;
    plan->io = plan->hists + h->n_hists;
    plan->costs = plan->io + h->n_io;
    plan->bounds = (const double *)(plan->costs + h->n_costs);
    plan->bounds2 = plan->bounds + h->n_bounds;
    plan->statuses = (const int64_t *)PyBytes_AS_STRING(statuses);
    plan->n_statuses = n_statuses;
    return 0;
}

/* bisect.bisect_left over n ascending doubles (a NaN lands in bucket 0). */
static Py_ssize_t
bucket_in(const double *bounds, Py_ssize_t n, double value)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < value) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* word_at for a caller that has checked `exported` already, inline: the same checks,
 * and word_at again only to say why one failed. A plan's dozen cells are checked on
 * every request, so the call each would otherwise cost is worth saving. */
static inline int64_t *
plan_cell(AtomicsObject *self, int64_t offset, Py_ssize_t words)
{
    if (offset < 0 || offset > (int64_t)self->view.len - WORD_SIZE * (int64_t)words ||
        ((uintptr_t)self->view.buf + (uintptr_t)offset) % WORD_SIZE != 0) {
        return word_at(self, offset, words); /* NULL, with the error set */
    }
    return (int64_t *)(void *)((char *)self->view.buf + offset);
}

/* Checks n offsets (cells of `words` words) into cells[0..n-1]. */
static int
plan_cells(AtomicsObject *self, const int64_t *offsets, int64_t n, Py_ssize_t words,
           int64_t **cells)
{
    for (int64_t i = 0; i < n; i++) {
        cells[i] = plan_cell(self, offsets[i], words);
        if (cells[i] == NULL) {
            return -1;
        }
    }
    return 0;
}

/* A request plan checked once (Atomics.plan): read_plan's Plan, and every cell it names
 * resolved to its address in the buffer of `owner`, the Atomics that made it, so that
 * recording a request under it converts and checks no offset. The addresses stay valid
 * while `owner` holds its export; each record checks that it does, and that the plan
 * is its own. `words` and `statuses` are kept: Plan's bounds point into `words`. */
typedef struct {
    PyObject_HEAD
    AtomicsObject *owner;
    PyObject *words, *statuses;
    Plan plan;
    int64_t *ones[MAX_BATCH], *hists[MAX_BATCH], *io[MAX_BATCH], *costs[MAX_BATCH];
    int64_t *second;     /* the time-to-first-token histogram */
    int64_t **statuses_at; /* [s]: the word status s adds 1 to; [n + s]: its class word */
} PlanObject;

static void
Plan_dealloc(PlanObject *self)
{
    PyMem_Free(self->statuses_at);
    Py_XDECREF(self->words);
    Py_XDECREF(self->statuses);
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm._atomics.RequestPlan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request plan, its cells checked against one Atomics (Atomics.plan()).",
};

/* Resolves every cell of p->plan in self's buffer (each checked as word_at does). */
static int
resolve_plan(AtomicsObject *self, PlanObject *p)
{
    const Plan *plan = &p->plan;
    const PlanHead *h = &plan->head;
    if (plan_cells(self, plan->ones, h->n_ones, 1, p->ones) < 0 ||
        plan_cells(self, plan->hists, h->n_hists, h->n_bounds + 2, p->hists) < 0 ||
        plan_cells(self, plan->io, h->n_io, 1, p->io) < 0 ||
        plan_cells(self, plan->costs, h->n_costs, 1, p->costs) < 0) {
        return -1;
    }
    p->second = plan_cell(self, h->second_hist, h->n_bounds2 + 2);
    if (p->second == NULL) {
        return -1;
    }
    Py_ssize_t n = plan->n_statuses;
    p->statuses_at = PyMem_Malloc(2 * n * sizeof(int64_t *));
    if (p->statuses_at == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t s = 0; s < n; s++) {
        p->statuses_at[s] = plan_cell(self, plan->statuses[s], 1);
        p->statuses_at[n + s] = p->statuses_at[s] == NULL
                                    ? NULL
                                    : plan_cell(self, h->class_base + plan->statuses[n + s], 1);
        if (p->statuses_at[n + s] == NULL) {
            return -1;
        }
    }
    return 0;
}

/* plan(words, statuses): the RequestPlan of llmkit.metrics.pack_plan's words and
 * status_table's statuses, every cell checked now (IndexError, ValueError). */
static PyObject *
Atomics_plan(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plan() takes words and statuses");
        return NULL;
    }
    if (!self->exported) {
        PyErr_SetString(PyExc_ValueError, "operation on a released Atomics");
        return NULL;
    }
    PlanObject *p = PyObject_New(PlanObject, &PlanType);
    if (p == NULL) {
        return NULL;
    }
    p->owner = NULL;
    p->words = p->statuses = NULL;
    p->statuses_at = NULL;
    if (read_plan(args[0], args[1], &p->plan) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    p->words = Py_NewRef(args[0]);
    p->statuses = Py_NewRef(args[1]);
    p->owner = (AtomicsObject *)Py_NewRef(self);
    if (resolve_plan(self, p) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    return (PyObject *)p;
}

/* obj as a plan that self may record under: one of its own, its buffer still held. */
static PlanObject *
own_plan(AtomicsObject *self, PyObject *obj)
{
    if (!self->exported) {
        PyErr_SetString(PyExc_ValueError, "operation on a released Atomics");
        return NULL;
    }
    if (!Py_IS_TYPE(obj, &PlanType)) {
        PyErr_SetString(PyExc_TypeError, "a plan is what Atomics.plan() returns");
        return NULL;
    }
    if (((PlanObject *)obj)->owner != self) {
        PyErr_SetString(PyExc_ValueError, "the plan was made by another Atomics");
        return NULL;
    }
    return (PlanObject *)obj;
}

/* Every add of one finished request under plan p (own_plan's), plus a 1 at each of the
 * n_extra offsets in extra; every offset is checked before any word changes. */
static PyObject *
record_plan(AtomicsObject *self, const PlanObject *p, const Finished *f,
            PyObject *const *extra, Py_ssize_t n_extra)
{
    if (n_extra > MAX_BATCH) {
        PyErr_SetString(PyExc_TypeError, "record_request() takes too many extra words");
        return NULL;
    }
    int64_t *extra_cells[MAX_BATCH];
    for (Py_ssize_t i = 0; i < n_extra; i++) {
        int64_t offset = as_i64(extra[i]);
        if (offset == -1 && PyErr_Occurred()) {
            return NULL;
        }
        extra_cells[i] = plan_cell(self, offset, 1);
        if (extra_cells[i] == NULL) {
            return NULL;
        }
    }
    const Plan *plan = &p->plan;
    const PlanHead *h = &plan->head;
    Py_ssize_t last = plan->n_statuses - 1;
    Py_ssize_t status = f->status < 0 ? 0 : (f->status > last ? last : (Py_ssize_t)f->status);
    for (int64_t i = 0; i < h->n_ones; i++) {
        __atomic_fetch_add(p->ones[i], 1, __ATOMIC_SEQ_CST);
    }
    __atomic_fetch_add(p->statuses_at[status], 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(p->statuses_at[last + 1 + status], 1, __ATOMIC_SEQ_CST);
    for (Py_ssize_t i = 0; i < n_extra; i++) {
        __atomic_fetch_add(extra_cells[i], 1, __ATOMIC_SEQ_CST);
    }
    Py_ssize_t bucket = bucket_in(plan->bounds, h->n_bounds, f->value);
    for (int64_t i = 0; i < h->n_hists; i++) {
        __atomic_fetch_add(p->hists[i] + bucket, 1, __ATOMIC_SEQ_CST);
        add_f64_at(p->hists[i] + h->n_bounds + 1, f->value);
    }
    if (f->in_delta || f->out_delta) {
        for (int64_t i = 0; i < h->n_io; i++) {
            __atomic_fetch_add(p->io[i], i % 2 ? f->out_delta : f->in_delta, __ATOMIC_SEQ_CST);
        }
    }
    if (f->cost != 0.0) {
        for (int64_t i = 0; i < h->n_costs; i++) {
            add_f64_at(p->costs[i], f->cost);
        }
    }
    if (f->has_second) {
        Py_ssize_t at = bucket_in(plan->bounds2, h->n_bounds2, f->second);
        __atomic_fetch_add(p->second + at, 1, __ATOMIC_SEQ_CST);
        add_f64_at(p->second + h->n_bounds2 + 1, f->second);
    }
    Py_RETURN_NONE;
}

/* record_request(plan, status, value, in_delta, out_delta, cost, second, *ones)
 *
 * Every add one finished request makes, in one call (see Plan): `value` into the
 * histograms, `second` (None: nothing) into the second one, the tokens, the cost, a 1
 * at the plan's ones, its status words and each of the trailing *ones. */
static PyObject *
Atomics_record_request(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 7) {
        PyErr_SetString(PyExc_TypeError, "record_request() takes plan, status, value, "
                                         "in_delta, out_delta, cost, second, *ones");
        return NULL;
    }
    Arg status, value, in_delta, out_delta, cost, second = {.f = 0.0};
    if (convert_arg('i', args[1], &status) < 0 || convert_arg('f', args[2], &value) < 0 ||
        convert_arg('i', args[3], &in_delta) < 0 || convert_arg('i', args[4], &out_delta) < 0 ||
        convert_arg('f', args[5], &cost) < 0) {
        return NULL;
    }
    int has_second = args[6] != Py_None;
    if (has_second && convert_arg('f', args[6], &second) < 0) {
        return NULL;
    }
    Finished f = {status.i, in_delta.i, out_delta.i, value.f, cost.f, second.f, has_second};
    const PlanObject *plan = own_plan(self, args[0]);
    if (plan == NULL) {
        return NULL;
    }
    return record_plan(self, plan, &f, args + 7, nargs - 7);
}

/* record_finished(plan, status, started_ns, first_ns, in_delta, out_delta, cached)
 *
 * record_request for the usual request, ending now: `value` is its duration from
 * started_ns to now on CLOCK_MONOTONIC (time.monotonic_ns's clock) in seconds,
 * `second` its time to first token, from started_ns to first_ns (0: none), and its
 * cost llmkit.pricing.Price.cost's arithmetic over the plan's prices, `cached` of the
 * in_delta tokens at the cached price (ignored when the plan has none). Each is the
 * float the same Python expression gives, bit for bit (no FMA contraction: setup.py
 * compiles with -ffp-contract=off). */
static PyObject *
Atomics_record_finished(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "record_finished() takes plan, status, started_ns, "
                                         "first_ns, in_delta, out_delta, cached");
        return NULL;
    }
    /* status, started_ns, first_ns, in_delta, out_delta, cached: ints (as_i64) */
    int64_t v[6];
    for (int i = 0; i < 6; i++) {
        v[i] = as_i64(args[i + 1]);
        if (v[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    int64_t started = v[1], first = v[2], in_delta = v[3], out_delta = v[4];
    const PlanObject *plan = own_plan(self, args[0]);
    if (plan == NULL) {
        return NULL;
    }
    const PlanHead *h = &plan->plan.head;
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int64_t now_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    int64_t cached = h->has_cached_price ? v[5] : 0;
    /* Price.cost: fresh * input + out * output, then + cached * cached_input, / 1e6 */
    double total = (double)(in_delta - cached) * h->price_in + (double)out_delta * h->price_out;
    if (cached) {
        total += (double)cached * h->price_cached;
    }
    Finished f = {
        .status = v[0],
        .in_delta = in_delta,
        .out_delta = out_delta,
        .value = (double)(now_ns - started) / 1e9,
        .cost = total / 1e6,
        .second = first ? (double)(first - started) / 1e9 : 0.0,
        .has_second = first != 0,
    };
    return record_plan(self, plan, &f, NULL, 0);
}

/* ------------------------------------------------------------------------ */
/* --- multiplexer ---                                                       */
/* ------------------------------------------------------------------------ */

/*
 * The cross-worker in-flight table (llmkit/mux_table.py is its reference):
 * `slots` slots of `stride` bytes from `offset`, each slot four int64 words:
 *
 *   +0 tag (0 = free)   +8 owner (0 = not yet published)   +16 pid   +24 claimed_ns
 *
 * A key's probe window is the `probes` slots from slot (tag mod slots),
 * wrapping at the end.  One C call does what would otherwise be a dozen
 * Python-level loads, a CAS and three stores.  Where a tag is asked for, the
 * key's bytes may be given instead: they are hashed here (mux_tag), so the
 * unshared path makes no separate call for its tag.
 */

#define MUX_TAG 0
#define MUX_OWNER 1
#define MUX_PID 2
#define MUX_CLAIMED 3
#define MUX_WORDS 4
#define MUX_TAKEN -1
#define MUX_FULL -2
#define MUX_MAX_PROBES 64
#define MUX_MAX_SLOTS (1 << 24)
#define MUX_MAX_STRIDE 4096

static const char *const P_MUX_ACQUIRE[] = {"offset", "stride", "slots", "probes",
                                            "tag", "owner", "pid"};
static const char *const P_MUX_RELEASE[] = {"offset", "tag", "owner"};

static const Signature SIG_MUX_ACQUIRE = {"mux_acquire", "iiiikii", P_MUX_ACQUIRE, 7, 7, 0};
static const Signature SIG_MUX_RELEASE = {"mux_release", "iki", P_MUX_RELEASE, 3, 3, 2};


/* The table's first word, once its geometry is checked and it lies in the buffer. */
static int64_t *
mux_table_at(AtomicsObject *self, const Arg *a)
{
    int64_t stride = a[1].i, slots = a[2].i, probes = a[3].i;
    if (stride < WORD_SIZE * MUX_WORDS || stride > MUX_MAX_STRIDE || stride % WORD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "stride must be a multiple of 8 in 32..4096");
        return NULL;
    }
    if (slots < 1 || slots > MUX_MAX_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "slots must be in 1..2**24");
        return NULL;
    }
    if (probes < 1 || probes > slots || probes > MUX_MAX_PROBES) {
        PyErr_SetString(PyExc_ValueError, "probes must be in 1..min(slots, 64)");
        return NULL;
    }
    if (a[4].i == 0) {
        PyErr_SetString(PyExc_ValueError, "tag 0 marks a free slot");
        return NULL;
    }
    /* Bounded above, so no overflow: the last slot's four words must fit. */
    Py_ssize_t words = (Py_ssize_t)(((slots - 1) * stride) / WORD_SIZE + MUX_WORDS);
    return word_at(self, a[0].i, words);
}

static int64_t
mux_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static PyObject *
mux_owner_found(int64_t index, int64_t *slot)
{
    int64_t owner = __atomic_load_n(slot + MUX_OWNER, __ATOMIC_ACQUIRE);
    if (owner == 0) {
        return PyLong_FromLong(MUX_TAKEN); /* claimed, not yet published */
    }
    int64_t pid = __atomic_load_n(slot + MUX_PID, __ATOMIC_ACQUIRE);
    return Py_BuildValue("(LLL)", (long long)index, (long long)owner, (long long)pid);
}

/* Find-or-claim a[4] (tag) for a[5] (owner), a[6] (pid) in the table of geometry
 * a[0..3]; `counter`, when not NULL, gains 1 when a slot is claimed. */
static PyObject *
mux_find_or_claim(AtomicsObject *self, const Arg *a, int64_t *counter)
{
    int64_t *table = mux_table_at(self, a);
    if (table == NULL) {
        return NULL;
    }
    int64_t stride = a[1].i / WORD_SIZE, slots = a[2].i, probes = a[3].i, tag = a[4].i;
    int64_t start = tag % slots, index[MUX_MAX_PROBES], *slot[MUX_MAX_PROBES];
    int64_t first_free = -1;
    start += start < 0 ? slots : 0;
    for (int64_t p = 0; p < probes; p++) {
        index[p] = (start + p) % slots;
        slot[p] = table + index[p] * stride;
        int64_t held = __atomic_load_n(slot[p] + MUX_TAG, __ATOMIC_ACQUIRE);
        if (held == tag) {
            return mux_owner_found(index[p], slot[p]);
        }
        if (held == 0 && first_free < 0) {
            first_free = p;
        }
    }
    for (int64_t p = first_free; p >= 0 && p < probes; p++) {
        int64_t expected = 0;
        if (!__atomic_compare_exchange_n(slot[p] + MUX_TAG, &expected, tag, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            continue;
        }
        /* A rival may have claimed the same tag elsewhere in the window between
         * our scan and our CAS.  Of two such CASes the later one's re-check sees
         * the earlier (sequential consistency), so at most one claim survives;
         * both may give up, and both callers then look again (TAKEN). */
        for (int64_t q = 0; q < probes; q++) {
            if (q != p && __atomic_load_n(slot[q] + MUX_TAG, __ATOMIC_SEQ_CST) == tag) {
                __atomic_store_n(slot[p] + MUX_TAG, 0, __ATOMIC_SEQ_CST);
                return PyLong_FromLong(MUX_TAKEN);
            }
        }
        __atomic_store_n(slot[p] + MUX_PID, a[6].i, __ATOMIC_SEQ_CST);
        __atomic_store_n(slot[p] + MUX_CLAIMED, mux_now_ns(), __ATOMIC_SEQ_CST);
        __atomic_store_n(slot[p] + MUX_OWNER, a[5].i, __ATOMIC_SEQ_CST);
        if (counter != NULL) {
            __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST);
        }
        return PyLong_FromLongLong(index[p]);
    }
    return PyLong_FromLong(MUX_FULL);
}

static PyObject *
Atomics_mux_acquire(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    Arg a[7];
    if (parse_args(&SIG_MUX_ACQUIRE, args, nargs, kwnames, a) < 0) {
        return NULL;
    }
    return mux_find_or_claim(self, a, NULL);
}

/* Frees `slot` if `owner` still holds it (owner first, then the tag, each by CAS, so a
 * slot that changed hands meanwhile is left alone): True if it was freed. */
static PyObject *
mux_free(int64_t *slot, int64_t owner, int64_t tag)
{
    if (!__atomic_compare_exchange_n(slot + MUX_OWNER, &owner, 0, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_ACQUIRE)) {
        Py_RETURN_FALSE;
    }
    __atomic_compare_exchange_n(slot + MUX_TAG, &tag, 0, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_ACQUIRE);
    Py_RETURN_TRUE;
}

static PyObject *
Atomics_mux_release(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    Arg a[3];
    int64_t *slot = parse_cell(self, &SIG_MUX_RELEASE, args, nargs, kwnames, a);
    if (slot == NULL) {
        return NULL;
    }
    return mux_free(slot, a[2].i, a[1].i);
}

/*
 * A leader's calls, mux_lead(table, key) and mux_unlead(table, index, key): `table` is
 * bytes packing seven native int64 words, built once per worker (mux_table.py,
 * MuxTable.leader_words): offset, stride, slots, probes (the geometry), owner, pid,
 * and the offset of a counter that gains 1 with each claim (-1: none). So the
 * unshared path's two calls convert no Python ints but a slot index.
 */
#define MUX_LEADER_WORDS 7

static int
mux_leader_words(PyObject *table, Arg *a)
{
    if (!PyBytes_CheckExact(table) ||
        PyBytes_GET_SIZE(table) != MUX_LEADER_WORDS * WORD_SIZE) {
        PyErr_SetString(PyExc_TypeError, "table must be bytes of 7 int64 words");
        return -1;
    }
    const char *words = PyBytes_AS_STRING(table);
    for (int i = 0; i < MUX_LEADER_WORDS; i++) {
        memcpy(&a[i].i, words + i * WORD_SIZE, WORD_SIZE);
    }
    return 0;
}

/* mux_acquire(offset, stride, slots, probes, tag, owner, pid) from table's words, the
 * claim also adding 1 to the table's counter (if any). */
static PyObject *
Atomics_mux_lead(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Arg w[MUX_LEADER_WORDS], a[7];
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "mux_lead() takes table, key");
        return NULL;
    }
    if (mux_leader_words(args[0], w) < 0 || convert_arg('k', args[1], &a[4]) < 0) {
        return NULL;
    }
    int64_t *counter = NULL;
    if (w[6].i != -1 && (counter = word_at(self, w[6].i, 1)) == NULL) {
        return NULL;
    }
    a[0] = w[0], a[1] = w[1], a[2] = w[2], a[3] = w[3], a[5] = w[4], a[6] = w[5];
    return mux_find_or_claim(self, a, counter);
}

/* mux_release of slot `index` of the table in table's words, for its owner. */
static PyObject *
Atomics_mux_unlead(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Arg w[MUX_LEADER_WORDS], index, tag;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "mux_unlead() takes table, index, key");
        return NULL;
    }
    if (mux_leader_words(args[0], w) < 0 || convert_arg('i', args[1], &index) < 0 ||
        convert_arg('k', args[2], &tag) < 0) {
        return NULL;
    }
    int64_t stride = w[1].i, slots = w[2].i;
    if (stride < WORD_SIZE * MUX_WORDS || stride > MUX_MAX_STRIDE || stride % WORD_SIZE ||
        index.i < 0 || index.i >= slots || slots > MUX_MAX_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "bad table geometry or slot index");
        return NULL;
    }
    int64_t *slot = word_at(self, w[0].i + index.i * stride, MUX_WORDS);
    if (slot == NULL) {
        return NULL;
    }
    return mux_free(slot, w[4].i, tag.i);
}

/*
 * The table tag of a request key (its canonical bytes): a 64-bit hash, never 0.
 * MurmurHash3's x64 mixing over 8-byte words, its fmix64 finalizer at the end:
 * one multiply-rotate-multiply per word, so a long prompt costs about a byte
 * copy.  The tag only spreads keys over the table and names a candidate owner;
 * sharing is decided on the full key (llmkit/mux_link.py), so a collision costs
 * a missed deduplication, never a wrong answer.  Native-endian: every worker of
 * one segment runs on one host.
 */
static uint64_t
mux_fmix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static uint64_t
mux_mix(uint64_t h, uint64_t word)
{
    word *= 0x87c37b91114253d5ULL;
    word = (word << 31) | (word >> 33);
    word *= 0x4cf5ad432745937fULL;
    h ^= word;
    h = (h << 27) | (h >> 37);
    return h * 5 + 0x52dce729;
}

/* The tag of a bytes-like key; 0 with an exception set if it is not one. */
static int64_t
mux_tag_of(PyObject *key)
{
    Py_buffer view;
    if (PyObject_GetBuffer(key, &view, PyBUF_SIMPLE) < 0) {
        return 0;
    }
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n, word;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&word, p, 8);
        h = mux_mix(h, word);
    }
    if (n > 0) {
        word = 0;
        memcpy(&word, p, (size_t)n);
        h = mux_mix(h, word);
    }
    PyBuffer_Release(&view);
    int64_t tag = (int64_t)mux_fmix64(h);
    return tag ? tag : 1;
}

static PyObject *
Atomics_mux_tag(AtomicsObject *Py_UNUSED(self), PyObject *key)
{
    int64_t tag = mux_tag_of(key);
    return tag == 0 ? NULL : PyLong_FromLongLong(tag);
}

/* ------------------------------------------------------------------------ */
/* Type and module                                                           */
/* ------------------------------------------------------------------------ */

#define FASTCALL(name, signature, doc)                                             \
    {#name, (PyCFunction)(void (*)(void))Atomics_##name, METH_FASTCALL | METH_KEYWORDS, \
     #name signature "\n--\n\n" doc}

static PyMethodDef Atomics_methods[] = {
    {"release", (PyCFunction)Atomics_release, METH_NOARGS,
     "release($self, /)\n--\n\n"
     "Drop the buffer export (so an mmap can be closed); later calls raise ValueError."},
    FASTCALL(load_i64, "($self, offset)", "Atomically load the int64 at offset."),
    FASTCALL(store_i64, "($self, offset, value)", "Atomically store an int64 at offset."),
    FASTCALL(add_i64, "($self, offset, delta)",
             "Atomically add delta to the int64 at offset; return the previous value."),
    FASTCALL(add_i64_clock, "($self, offset, delta)",
             "add_i64, returning the monotonic clock (ns) after the add instead."),
    FASTCALL(cas_i64, "($self, offset, expected, new)",
             "Store new at offset if it holds expected; return whether it did."),
    FASTCALL(max_i64, "($self, offset, value)",
             "Atomically raise the int64 at offset to value; return the previous value."),
    FASTCALL(load_f64, "($self, offset)", "Atomically load the float64 at offset."),
    FASTCALL(store_f64, "($self, offset, value)", "Atomically store a float64 at offset."),
    FASTCALL(add_f64, "($self, offset, delta)",
             "Atomically add delta to the float64 at offset; return the previous value."),
    FASTCALL(cas_f64, "($self, offset, expected, new)",
             "Store new at offset if its bit pattern equals expected's; return whether it did."),
    FASTCALL(gcra_acquire, "($self, offset, now_ns, interval_ns, capacity_ns, cost=1)",
             "Charge cost * interval_ns to the GCRA cell; return 0 if admitted, else the ns\n"
             "to wait (nothing is charged on refusal)."),
    FASTCALL(gcra_refund, "($self, offset, amount_ns)",
             "Give amount_ns back to the GCRA cell (after a later limiter refused)."),
    FASTCALL(gcra_peek, "($self, offset, now_ns, interval_ns, capacity_ns)",
             "Return the ns of capacity still free at now_ns, in [0, capacity_ns]."),
    FASTCALL(ewma_update, "($self, offset, sample, alpha)",
             "Fold sample into the 16-byte EWMA cell; return the new (mean, variance)."),
    FASTCALL(ewma_read, "($self, offset)",
             "Return (mean, variance) of the 16-byte EWMA cell; (0.0, 0.0) if empty."),
    {"add_ones", (PyCFunction)(void (*)(void))Atomics_add_ones, METH_FASTCALL,
     "add_ones($self, /, *offsets)\n--\n\n"
     "Atomically add 1 to the int64 at each offset (at most 32)."},
    {"add_i64s", (PyCFunction)(void (*)(void))Atomics_add_i64s, METH_FASTCALL,
     "add_i64s($self, /, *offset_delta_pairs)\n--\n\n"
     "Atomically add each delta to the int64 at its offset (at most 32 pairs)."},
    {"add_f64s", (PyCFunction)(void (*)(void))Atomics_add_f64s, METH_FASTCALL,
     "add_f64s($self, /, *offset_delta_pairs)\n--\n\n"
     "Atomically add each delta to the float64 at its offset (at most 32 pairs)."},
    {"plan", (PyCFunction)(void (*)(void))Atomics_plan, METH_FASTCALL,
     "plan($self, words, statuses, /)\n--\n\n"
     "A RequestPlan: pack_plan's words and status_table's statuses, every cell checked\n"
     "against this buffer once, for record_request and record_finished."},
    {"record_request", (PyCFunction)(void (*)(void))Atomics_record_request, METH_FASTCALL,
     "record_request($self, plan, status, value, in_delta, out_delta, cost, second, /,\n"
     "               *ones)\n--\n\n"
     "Every add of one finished request in one call; see Plan in the C source."},
    {"record_finished", (PyCFunction)(void (*)(void))Atomics_record_finished, METH_FASTCALL,
     "record_finished($self, plan, status, started_ns, first_ns, in_delta, out_delta,\n"
     "                cached, /)\n"
     "--\n\n"
     "record_request for a request ending now: duration, time to first token and cost\n"
     "computed here from the monotonic clock and the plan's prices."},
    {"observe", (PyCFunction)(void (*)(void))Atomics_observe, METH_FASTCALL,
     "observe($self, bounds, value, /, *offsets)\n--\n\n"
     "Add value to the histogram at each offset: its bucket (bisect_left over the\n"
     "tuple of float bounds) gains 1 and its sum value."},
    /* --- multiplexer --- */
    FASTCALL(mux_acquire, "($self, offset, stride, slots, probes, tag, owner, pid)",
             "Find-or-claim tag (an int, or a key's bytes: their mux_tag) in the in-flight\n"
             "table (llmkit/mux_table.py): the claimed\n"
             "slot's index, -1 while another claim is unpublished or won a race, -2 when\n"
             "the probe window is full, or (index, owner, pid) of the published owner."),
    {"mux_lead", (PyCFunction)(void (*)(void))Atomics_mux_lead, METH_FASTCALL,
     "mux_lead($self, table, key, /)\n--\n\n"
     "mux_acquire for a leader, with the table's words packed once (see the C source):\n"
     "a claim also adds 1 to the table's counter."},
    {"mux_unlead", (PyCFunction)(void (*)(void))Atomics_mux_unlead, METH_FASTCALL,
     "mux_unlead($self, table, index, key, /)\n--\n\n"
     "mux_release of slot index of the table packed in table, for its owner."},
    {"mux_tag", (PyCFunction)Atomics_mux_tag, METH_O,
     "mux_tag($self, key, /)\n--\n\n"
     "The in-flight table's 64-bit tag (never 0) for a request key's bytes."},
    FASTCALL(mux_release, "($self, offset, tag, owner)",
             "Free the table slot at offset if owner still holds it for tag (an int, or a\n"
             "key's bytes); return\n"
             "whether it did."),
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods Atomics_as_mapping = {
    .mp_length = (lenfunc)Atomics_length,
};

PyDoc_STRVAR(Atomics_doc,
             "Atomics(buffer)\n--\n\n"
             "Atomic operations on 8-byte words of one writable buffer (mmap, bytearray, ...).\n\n"
             "Holds a writable export of the buffer until release() or deallocation, so an\n"
             "mmap cannot be closed underneath it.  Every method checks that its cell lies\n"
             "inside the buffer (IndexError) and is 8-byte aligned in memory (ValueError).");

static PyTypeObject AtomicsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm._atomics.Atomics",
    .tp_basicsize = sizeof(AtomicsObject),
    .tp_dealloc = (destructor)Atomics_dealloc,
    .tp_as_mapping = &Atomics_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Atomics_doc,
    .tp_methods = Atomics_methods,
    .tp_new = Atomics_new,
};

static int
atomics_exec(PyObject *module)
{
    if (PyType_Ready(&AtomicsType) < 0 || PyType_Ready(&PlanType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "RequestPlan", (PyObject *)&PlanType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "Atomics", (PyObject *)&AtomicsType);
}

static PyModuleDef_Slot atomics_slots[] = {
    {Py_mod_exec, atomics_exec},
    {0, NULL},
};

PyDoc_STRVAR(
    module_doc,
    "Lock-free atomic operations on 8-byte words of a shared buffer.\n\n"
    "All cells start 8-byte aligned; offsets are in bytes from the buffer start.\n\n"
    "  int64 word    8 bytes   native-endian two's-complement int64\n"
    "  float64 word  8 bytes   native-endian IEEE-754 binary64 (CAS compares bits)\n"
    "  GCRA cell     8 bytes   int64 theoretical arrival time (TAT) in ns on the\n"
    "                          caller's clock; 0 = idle bucket\n"
    "  EWMA cell    16 bytes   word 0 (bytes 0-7) as a 64-bit integer:\n"
    "                            bits  0-31  mean, IEEE binary32\n"
    "                            bits 32-63  variance, IEEE binary32\n"
    "                            all 64 bits zero = empty cell\n"
    "                          word 1 (bytes 8-15): int64 count of updates\n\n"
    "Mean and variance share one word so a single CAS updates both: lock-free, and\n"
    "a process killed mid-update (SIGKILL) never leaves a torn or locked cell.\n"
    "A zero mean and variance is stored with variance -0.0 so it never reads as\n"
    "empty; readers get 0.0.");

static struct PyModuleDef atomics_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shm._atomics",
    .m_doc = module_doc,
    .m_size = 0,
    .m_slots = atomics_slots,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    return PyModuleDef_Init(&atomics_module);
}
