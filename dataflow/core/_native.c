/* The per-event hot paths of the state core, compiled: building valid events, fanning them
 * out into counter updates, applying the updates, rendering a key's fields, packing the
 * Redis writes and a shard's snapshot buffer.
 *
 * Each function here has a pure-Python reference in the package, and gives the same result
 * to the byte (tests/core/test_native.py holds them to it with Hypothesis):
 *
 *   apply          FeatureShard.step's loop over one batch of updates (counters.add)
 *   add            counters.add
 *   pack_states    counters.pack_states (and unpack_states, unpack_states_layout_4): a
 *                  shard's keys for a snapshot
 *   render         FeatureShard.flush's loop over the keys to write (families.fields_for)
 *   fields_for     families.fields_for, as a `Fields` (a mapping held as the RESP of the
 *                  key's HSET pairs, equal to the reference's dict, in the same order)
 *   pack_writes    sinks.redis.RedisWriter's RESP packing of a chunk of writes
 *   fan_out        flow.FanOut (families.updates_for of each event, flow.by_feature_shard)
 *   shard_of       flow.shard_of
 *   event_from     events.decode's event, for a valid event of the common shape
 *   float_repr     repr(float), as the renderer writes floats
 *
 * The arithmetic is the reference's, step for step: int64 counts (checked, never wrapping),
 * IEEE doubles combined in the same order, libm's exp2 (which CPython's math.exp2 calls),
 * round-half-even, and floats written as CPython's repr writes them (Ryu's shortest digits,
 * CPython's choice of notation; inf and nan by CPython itself). A key whose window sums do
 * not fit an int64 is handed to the Python reference instead.
 *
 * The constants below are the contract's (dataflow.core.windows, dataflow.core.events);
 * CONSTANTS exposes them so that a test can check them against the Python ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Shortest round-trip digits of a double (Ryu, vendored in ryu/): `d2d`, `d2d_small_int`. */
#include "ryu/d2s.c"

#define DAY_MS 86400000LL
#define HALF_LIFE_MS (7LL * DAY_MS)
#define WEIGHT_SCALE 4294967296.0 /* 2^32 */
#define EXPECTED_SCALE 4294967296.0
#define WINDOW_7D 7
#define WINDOW_30D 30
#define RETENTION_DAYS 30
#define MAX_COUNTS 8
#define MAX_DECAYED 4
#define N_FAMILIES 4
#define N_PARAMS 12

enum { DOC = 0, QD = 1, AC = 2, ACQ = 3 };

static PyObject *zero_item; /* array('q', [0]) */

/* ---- time ------------------------------------------------------------------------------ */

static inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}

/* windows.forward_weight: round(exp2(offset / HALF_LIFE_MS) * 2^32), half to even. */
static inline int64_t forward_weight(int64_t ts) {
    int64_t offset = ts - floor_div(ts, DAY_MS) * DAY_MS;
    double w = nearbyint(exp2((double)offset / (double)HALF_LIFE_MS) * WEIGHT_SCALE);
    return (int64_t)w;
}

/* ---- buffers and text ------------------------------------------------------------------ */

/* Decimal text of `value` into `out` (at least 21 bytes); returns its length. */
static int format_int(int64_t value, char *out) {
    char digits[24];
    int n = 0;
    uint64_t v = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    int len = 0;
    if (value < 0) out[len++] = '-';
    while (n) out[len++] = digits[--n];
    return len;
}

typedef struct {
    char *data;
    size_t len, cap;
} Buffer;

static int grow(Buffer *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(Buffer *b, const char *text, size_t n) {
    if (grow(b, n) < 0) return -1;
    memcpy(b->data + b->len, text, n);
    b->len += n;
    return 0;
}

/* One RESP bulk string, `$<len>\r\n<a><c>\r\n`: the text of `a` followed by that of `c`
 * (a key is its prefix and ":" in `a`, its suffix in `c`; any other string has no `c`). */
static int put_bulk(Buffer *b, const char *a, Py_ssize_t na, const char *c, Py_ssize_t nc) {
    char head[32];
    head[0] = '$';
    int nh = 1 + format_int((int64_t)(na + nc), head + 1);
    head[nh++] = '\r';
    head[nh++] = '\n';
    if (grow(b, (size_t)nh + (size_t)na + (size_t)nc + 2) < 0) return -1;
    memcpy(b->data + b->len, head, (size_t)nh);
    b->len += (size_t)nh;
    memcpy(b->data + b->len, a, (size_t)na);
    b->len += (size_t)na;
    if (nc) {
        memcpy(b->data + b->len, c, (size_t)nc);
        b->len += (size_t)nc;
    }
    memcpy(b->data + b->len, "\r\n", 2);
    b->len += 2;
    return 0;
}

static const char *utf8(PyObject *s, Py_ssize_t *n) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(s)->tp_name);
        return NULL;
    }
    return PyUnicode_AsUTF8AndSize(s, n);
}

/* ---- layouts --------------------------------------------------------------------------- */

typedef struct {
    int counts;
    int n_decayed;
    int decayed[MAX_DECAYED];
    int width;
} Layout;

/* `layouts`: one (counts, decayed indexes) pair per family, as families.LAYOUTS holds. */
static int parse_layouts(PyObject *layouts, Layout *out) {
    if (!PyTuple_Check(layouts) || PyTuple_GET_SIZE(layouts) != N_FAMILIES) {
        PyErr_SetString(PyExc_TypeError, "layouts: a tuple of 4 (counts, decayed) pairs");
        return -1;
    }
    for (int f = 0; f < N_FAMILIES; f++) {
        PyObject *pair = PyTuple_GET_ITEM(layouts, f);
        PyObject *decayed;
        int counts;
        if (!PyArg_ParseTuple(pair, "iO!", &counts, &PyTuple_Type, &decayed)) return -1;
        Py_ssize_t m = PyTuple_GET_SIZE(decayed);
        if (counts < 1 || counts > MAX_COUNTS || m > MAX_DECAYED) {
            PyErr_SetString(PyExc_ValueError, "layouts: too many counts or decayed sums");
            return -1;
        }
        out[f].counts = counts;
        out[f].n_decayed = (int)m;
        for (Py_ssize_t j = 0; j < m; j++) {
            long i = PyLong_AsLong(PyTuple_GET_ITEM(decayed, j));
            if (i == -1 && PyErr_Occurred()) return -1;
            if (i < 0 || i >= counts) {
                PyErr_SetString(PyExc_ValueError, "layouts: a decayed index out of range");
                return -1;
            }
            out[f].decayed[j] = (int)i;
        }
        out[f].width = 1 + counts + (int)m;
    }
    return 0;
}

/* ---- counters.add ---------------------------------------------------------------------- */

static int overflow(void) {
    PyErr_SetString(PyExc_OverflowError, "a counter does not fit an int64");
    return -1;
}

/* The counts of one update, read into `counts` (as many as the layout has). */
static int read_counts(PyObject *seq, const Layout *layout, int64_t *counts) {
    PyObject *fast = PySequence_Fast(seq, "counts must be a sequence");
    if (fast == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != layout->counts) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "counts do not match the family's layout");
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (int i = 0; i < layout->counts; i++) {
        long long n = PyLong_AsLongLong(items[i]);
        if (n == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        counts[i] = n;
    }
    Py_DECREF(fast);
    return 0;
}

/* `[day, counts..., counts[i] * weight for i in decayed]` into `record`. */
static int fill_record(const Layout *layout, int64_t ts, const int64_t *counts, int64_t *record) {
    record[0] = floor_div(ts, DAY_MS);
    for (int i = 0; i < layout->counts; i++) record[1 + i] = counts[i];
    if (layout->n_decayed) {
        int64_t weight = forward_weight(ts);
        for (int j = 0; j < layout->n_decayed; j++) {
            if (__builtin_mul_overflow(counts[layout->decayed[j]], weight,
                                       &record[1 + layout->counts + j]))
                return overflow();
        }
    }
    return 0;
}

/* A new array('q') of `items`: `array('q', [0]) * n` (the array module's own C path, no
 * argument parsing), then the items copied in. */
static PyObject *new_array(const int64_t *items, Py_ssize_t n) {
    PyObject *state = PySequence_Repeat(zero_item, n);
    if (state == NULL) return NULL;
    /* An array refers to no other object, so it can be in no reference cycle: out of the
     * cyclic collector's lists, a million key states cost its collections nothing. */
    if (PyObject_IS_GC(state)) PyObject_GC_UnTrack(state);
    if (n == 0) return state;
    Py_buffer view;
    if (PyObject_GetBuffer(state, &view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(state);
        return NULL;
    }
    memcpy(view.buf, items, (size_t)n * sizeof(int64_t));
    PyBuffer_Release(&view);
    return state;
}

static int get_state_buffer(PyObject *state, Py_buffer *view) {
    if (PyObject_GetBuffer(state, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "q") != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "a key state must be an array('q')");
        return -1;
    }
    return 0;
}

/* counters.add on an existing state (in place), or a new one when `state` is NULL.
 * Returns a new reference to the state. */
static PyObject *add_counts(PyObject *state, const Layout *layout, int64_t ts,
                            const int64_t *counts) {
    int64_t record[1 + MAX_COUNTS + MAX_DECAYED];
    if (state == NULL) {
        int64_t fresh[2 + MAX_COUNTS + MAX_DECAYED];
        fresh[0] = ts;
        if (fill_record(layout, ts, counts, fresh + 1) < 0) return NULL;
        return new_array(fresh, 1 + layout->width);
    }
    Py_buffer view;
    if (get_state_buffer(state, &view) < 0) return NULL;
    int64_t *s = (int64_t *)view.buf;
    Py_ssize_t len = view.len / 8;
    int width = layout->width;
    int64_t day = floor_div(ts, DAY_MS);
    if (len < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "an empty key state");
        return NULL;
    }
    if (ts > s[0]) s[0] = ts;
    Py_ssize_t pos = len - width;
    while (pos >= 1 && s[pos] > day) pos -= width;
    if (pos >= 1 && s[pos] == day) {
        int64_t *at = s + pos + 1;
        for (int i = 0; i < layout->counts; i++) {
            if (counts[i] && __builtin_add_overflow(at[i], counts[i], &at[i])) {
                PyBuffer_Release(&view);
                overflow();
                return NULL;
            }
        }
        int64_t weight = 0;
        int64_t *sums = at + layout->counts;
        for (int j = 0; j < layout->n_decayed; j++) {
            int64_t n = counts[layout->decayed[j]], added;
            if (!n) continue;
            if (!weight) weight = forward_weight(ts);
            if (__builtin_mul_overflow(n, weight, &added) ||
                __builtin_add_overflow(sums[j], added, &sums[j])) {
                PyBuffer_Release(&view);
                overflow();
                return NULL;
            }
        }
        PyBuffer_Release(&view);
        Py_INCREF(state);
        return state;
    }
    PyBuffer_Release(&view);
    if (fill_record(layout, ts, counts, record) < 0) return NULL;
    PyObject *inserted = new_array(record, width);
    if (inserted == NULL) return NULL;
    Py_ssize_t insert_at = pos >= 1 ? pos + width : 1;
    int rc = PySequence_SetSlice(state, insert_at, insert_at, inserted);
    Py_DECREF(inserted);
    if (rc < 0) return NULL;
    Py_INCREF(state);
    return state;
}

static int64_t as_int64(PyObject *o, int *error) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) *error = 1;
    return v;
}

/* add(state | None, layouts, family, ts, counts) -> state */
static PyObject *py_add(PyObject *self, PyObject *args) {
    PyObject *state, *layouts, *counts_obj;
    int family;
    long long ts;
    if (!PyArg_ParseTuple(args, "OOiLO", &state, &layouts, &family, &ts, &counts_obj)) return NULL;
    Layout table[N_FAMILIES];
    if (parse_layouts(layouts, table) < 0) return NULL;
    if (family < 0 || family >= N_FAMILIES) {
        PyErr_SetString(PyExc_ValueError, "no such family");
        return NULL;
    }
    int64_t counts[MAX_COUNTS];
    if (read_counts(counts_obj, &table[family], counts) < 0) return NULL;
    return add_counts(state == Py_None ? NULL : state, &table[family], ts, counts);
}

/* apply(updates, keys, dirty, created, deleted, layouts, clock, late_before)
 *   -> (clock, late_before, late)
 *
 * FeatureShard.step's loop over one batch of (family, suffix, ts, counts) updates: moves
 * the clock, counts the late ones, adds the rest and marks their keys dirty (and new keys
 * created, no longer deleted). */
static PyObject *py_apply(PyObject *self, PyObject *args) {
    PyObject *updates, *keys, *dirty, *created, *deleted, *layouts;
    long long clock, late_before;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!OLL", &updates, &PyDict_Type, &keys, &PySet_Type,
                          &dirty, &PySet_Type, &created, &PySet_Type, &deleted, &layouts, &clock,
                          &late_before))
        return NULL;
    Layout table[N_FAMILIES];
    if (parse_layouts(layouts, table) < 0) return NULL;
    PyObject *fast = PySequence_Fast(updates, "updates must be a sequence");
    if (fast == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    long long late = 0;
    int64_t counts[MAX_COUNTS];
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *u = items[k];
        if (!PyTuple_Check(u) || PyTuple_GET_SIZE(u) != 4) {
            PyErr_SetString(PyExc_TypeError, "an update is (family, suffix, ts, counts)");
            goto fail;
        }
        int error = 0;
        int64_t family = as_int64(PyTuple_GET_ITEM(u, 0), &error);
        PyObject *suffix = PyTuple_GET_ITEM(u, 1);
        int64_t ts = as_int64(PyTuple_GET_ITEM(u, 2), &error);
        if (error) goto fail;
        if (family < 0 || family >= N_FAMILIES) {
            PyErr_SetString(PyExc_ValueError, "no such family");
            goto fail;
        }
        if (ts > clock) {
            clock = ts;
            late_before = floor_div(clock, DAY_MS) - RETENTION_DAYS;
        }
        if (floor_div(ts, DAY_MS) <= late_before) {
            late++;
            continue;
        }
        const Layout *layout = &table[family];
        if (read_counts(PyTuple_GET_ITEM(u, 3), layout, counts) < 0) goto fail;
        PyObject *state = PyDict_GetItemWithError(keys, suffix); /* borrowed */
        if (state == NULL) {
            if (PyErr_Occurred()) goto fail;
            PyObject *fresh = add_counts(NULL, layout, ts, counts);
            if (fresh == NULL) goto fail;
            int rc = PyDict_SetItem(keys, suffix, fresh);
            Py_DECREF(fresh);
            if (rc < 0 || PySet_Discard(deleted, suffix) < 0 || PySet_Add(created, suffix) < 0)
                goto fail;
        } else {
            Py_INCREF(state); /* held across the Python calls a new day record makes */
            PyObject *same = add_counts(state, layout, ts, counts);
            Py_DECREF(state);
            if (same == NULL) goto fail;
            Py_DECREF(same);
        }
        if (PySet_Add(dirty, suffix) < 0) goto fail;
    }
    Py_DECREF(fast);
    return Py_BuildValue("LLL", clock, late_before, late);
fail:
    Py_DECREF(fast);
    return NULL;
}

/* ---- counters.pack_states / unpack_states: a shard's keys in one snapshot buffer ---------- */

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Snapshot layout 5: LEB128 varints, the items zigzag-encoded (counters.pack_states). */
static inline void put_varint(Buffer *b, uint64_t v) { /* caller has grown b by 10 */
    unsigned char *out = (unsigned char *)b->data + b->len;
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (unsigned char)v;
    b->len += n;
}

/* 0, or -1 with ValueError set (counters._get_varint's messages). */
static inline int get_varint(const unsigned char **at, const unsigned char *end, uint64_t *out) {
    const unsigned char *p = *at;
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
        if (p >= end) {
            PyErr_SetString(PyExc_ValueError, "a truncated key-state buffer");
            return -1;
        }
        unsigned byte = *p++;
        if (shift == 63 && byte > 1) {
            PyErr_SetString(PyExc_ValueError,
                            "a malformed key-state buffer (a varint past 64 bits)");
            return -1;
        }
        v |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) break;
    }
    *at = p;
    *out = v;
    return 0;
}

/* pack_states(keys) -> bytes: counters.pack_states. */
static PyObject *py_pack_states(PyObject *self, PyObject *keys) {
    if (!PyDict_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a dict");
        return NULL;
    }
    Buffer b = {NULL, 0, 0};
    Py_ssize_t pos = 0;
    PyObject *suffix, *state;
    while (PyDict_Next(keys, &pos, &suffix, &state)) {
        Py_ssize_t n;
        const char *name = utf8(suffix, &n);
        if (name == NULL) goto fail;
        Py_buffer view;
        if (get_state_buffer(state, &view) < 0) goto fail;
        size_t items = (size_t)view.len / 8;
        if (grow(&b, 20 + (size_t)n + items * 10) < 0) {
            PyBuffer_Release(&view);
            goto fail;
        }
        put_varint(&b, (uint64_t)n);
        memcpy(b.data + b.len, name, (size_t)n);
        b.len += (size_t)n;
        put_varint(&b, (uint64_t)items);
        const int64_t *item = view.buf;
        for (size_t i = 0; i < items; i++) /* zigzag: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ... */
            put_varint(&b, ((uint64_t)item[i] << 1) ^ (uint64_t)(item[i] >> 63));
        PyBuffer_Release(&view);
    }
    PyObject *out = PyBytes_FromStringAndSize(b.data ? b.data : "", (Py_ssize_t)b.len);
    PyMem_Free(b.data);
    return out;
fail:
    PyMem_Free(b.data);
    return NULL;
}

/* unpack_states(blob) -> dict: counters.unpack_states. */
static PyObject *py_unpack_states(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = in.buf, *end = p + in.len;
    int64_t *scratch = NULL;
    size_t room = 0;
    PyObject *keys = PyDict_New();
    if (keys == NULL) goto fail;
    while (p < end) {
        uint64_t size, count, z;
        if (get_varint(&p, end, &size) < 0) goto fail;
        if ((uint64_t)(end - p) < size) goto truncated;
        PyObject *suffix = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)size, "strict");
        if (suffix == NULL) goto fail;
        p += size;
        if (get_varint(&p, end, &count) < 0) {
            Py_DECREF(suffix);
            goto fail;
        }
        if ((uint64_t)(end - p) < count) { /* every item takes a byte at least */
            Py_DECREF(suffix);
            goto truncated;
        }
        if (count > room) {
            int64_t *grown = PyMem_Realloc(scratch, (size_t)count * sizeof(int64_t));
            if (grown == NULL) {
                Py_DECREF(suffix);
                PyErr_NoMemory();
                goto fail;
            }
            scratch = grown;
            room = (size_t)count;
        }
        for (uint64_t i = 0; i < count; i++) {
            if (get_varint(&p, end, &z) < 0) {
                Py_DECREF(suffix);
                goto fail;
            }
            scratch[i] = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
        }
        PyObject *state = new_array(scratch, (Py_ssize_t)count);
        int rc = state == NULL ? -1 : PyDict_SetItem(keys, suffix, state);
        Py_DECREF(suffix);
        Py_XDECREF(state);
        if (rc < 0) goto fail;
    }
    PyMem_Free(scratch);
    PyBuffer_Release(&in);
    return keys;
truncated:
    PyErr_SetString(PyExc_ValueError, "a truncated key-state buffer");
fail:
    PyMem_Free(scratch);
    Py_XDECREF(keys);
    PyBuffer_Release(&in);
    return NULL;
}

/* unpack_states_layout_4(blob) -> dict: counters.unpack_states_layout_4. */
static PyObject *py_unpack_states_layout_4(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = in.buf, *end = p + in.len;
    /* Count the keys first: a dict sized for them is never rehashed while it fills. */
    Py_ssize_t count = 0;
    for (const unsigned char *q = p; end - q >= 8; count++) {
        uint32_t n = get_u32(q);
        if ((size_t)(end - q - 4) < (size_t)n + 4) break;
        q += 4 + n;
        uint32_t items = get_u32(q);
        q += 4;
        if ((size_t)(end - q) / 8 < items) break;
        q += (size_t)items * 8;
    }
    PyObject *keys = _PyDict_NewPresized(count);
    if (keys == NULL) goto fail;
    while (p < end) {
        if (end - p < 4) goto truncated;
        uint32_t n = get_u32(p);
        p += 4;
        if ((size_t)(end - p) < (size_t)n + 4) goto truncated;
        PyObject *suffix = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
        if (suffix == NULL) goto fail;
        p += n;
        uint32_t items = get_u32(p);
        p += 4;
        if ((size_t)(end - p) / 8 < items) {
            Py_DECREF(suffix);
            goto truncated;
        }
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        int64_t *swapped = PyMem_Malloc((size_t)items * 8 + 1);
        if (swapped == NULL) {
            Py_DECREF(suffix);
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(swapped, p, (size_t)items * 8);
        for (size_t i = 0; i < items; i++)
            swapped[i] = (int64_t)__builtin_bswap64((uint64_t)swapped[i]);
        PyObject *state = new_array(swapped, items);
        PyMem_Free(swapped);
#else
        PyObject *state = new_array((const int64_t *)p, items);
#endif
        p += (size_t)items * 8;
        int rc = state == NULL ? -1 : PyDict_SetItem(keys, suffix, state);
        Py_DECREF(suffix);
        Py_XDECREF(state);
        if (rc < 0) goto fail;
    }
    PyBuffer_Release(&in);
    return keys;
truncated:
    PyErr_SetString(PyExc_ValueError, "a truncated key-state buffer");
fail:
    Py_XDECREF(keys);
    PyBuffer_Release(&in);
    return NULL;
}

/* ---- families.fields_for --------------------------------------------------------------- */

typedef struct {
    double alpha[N_FAMILIES], beta[N_FAMILIES];
    double weight_click, weight_impression, weight_long_click, coec_prior;
} Params;

/* `cparams`: families.native_params(params), 12 floats. */
static int parse_params(PyObject *cparams, Params *p) {
    if (!PyTuple_Check(cparams) || PyTuple_GET_SIZE(cparams) != N_PARAMS) {
        PyErr_SetString(PyExc_TypeError, "params: a tuple of 12 floats");
        return -1;
    }
    double v[N_PARAMS];
    for (int i = 0; i < N_PARAMS; i++) {
        v[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(cparams, i));
        if (v[i] == -1.0 && PyErr_Occurred()) return -1;
    }
    for (int f = 0; f < N_FAMILIES; f++) {
        p->alpha[f] = v[2 * f];
        p->beta[f] = v[2 * f + 1];
    }
    p->weight_click = v[8];
    p->weight_impression = v[9];
    p->weight_long_click = v[10];
    p->coec_prior = v[11];
    return 0;
}

/* Field names, in the order families.fields_for inserts them. */
enum {
    F_IMPRESSIONS_7D, F_CLICKS_7D, F_IMPRESSIONS_30D, F_CLICKS_30D, F_LONG_CLICKS_30D,
    F_CTR_7D, F_CTR_30D, F_IMPRESSIONS_DECAY, F_CLICKS_DECAY, F_CTR_DECAY, F_AS_OF,
    F_POPULARITY_7D, F_POPULARITY_30D, F_EXPECTED_CLICKS_30D, F_COEC_30D,
    F_SELECTS_7D, F_SELECTS_30D, F_SELECT_RATE_7D, F_SELECT_RATE_30D,
    F_SEARCHED_7D, F_CLICKED_7D, F_SEARCHED_30D, F_CLICKED_30D, F_SEARCH_RATE_30D,
    F_CLICK_RATE_30D, N_FIELDS
};
static const char *FIELD_NAMES[N_FIELDS] = {
    "impressions_7d", "clicks_7d", "impressions_30d", "clicks_30d", "long_clicks_30d",
    "ctr_7d", "ctr_30d", "impressions_decay", "clicks_decay", "ctr_decay", "as_of",
    "popularity_7d", "popularity_30d", "expected_clicks_30d", "coec_30d",
    "selects_7d", "selects_30d", "select_rate_7d", "select_rate_30d",
    "searched_7d", "clicked_7d", "searched_30d", "clicked_30d", "search_rate_30d",
    "click_rate_30d",
};
static char name_bulks[N_FIELDS][32]; /* each field's name as a RESP bulk string */
static int name_bulk_len[N_FIELDS];

/* ---- Fields: a rendered key's fields, held as the RESP of its HSET's field-value pairs --- */

/* A read-only mapping of field name to text, in the order the renderer writes them, stored as
 * the bulk strings an `HSET` sends (`$<n>\r\n<name>\r\n$<n>\r\n<value>\r\n` per pair): one
 * object per written key instead of a dict and a string per field, and `pack_writes` copies
 * the pairs as they are. It compares equal to the dict `families.fields_for` returns for the
 * same key (order aside, as dicts compare), and pickles as that dict. */
typedef struct {
    PyObject_VAR_HEAD /* ob_size: bytes of `data` */
    Py_ssize_t n;     /* pairs */
    char data[1];
} FieldsObject;

static PyTypeObject FieldsType;

/* The next bulk string at `*at` (before `end`): its text and length; -1 when malformed. */
static int next_bulk(const char **at, const char *end, const char **text, Py_ssize_t *n) {
    const char *p = *at;
    if (p >= end || *p != '$') return -1;
    Py_ssize_t len = 0;
    for (p++; p < end && *p != '\r'; p++) len = len * 10 + (*p - '0');
    p += 2;
    if (p + len + 2 > end) return -1;
    *text = p;
    *n = len;
    *at = p + len + 2;
    return 0;
}

/* Calls `each(name, nname, value, nvalue, arg)` per pair, in order; stops at a nonzero. */
static int fields_each(FieldsObject *f,
                       int (*each)(const char *, Py_ssize_t, const char *, Py_ssize_t, void *),
                       void *arg) {
    const char *at = f->data, *end = f->data + Py_SIZE(f);
    while (at < end) {
        const char *name, *value;
        Py_ssize_t nn, nv;
        if (next_bulk(&at, end, &name, &nn) < 0 || next_bulk(&at, end, &value, &nv) < 0) {
            PyErr_SetString(PyExc_SystemError, "malformed Fields");
            return -1;
        }
        int rc = each(name, nn, value, nv, arg);
        if (rc) return rc;
    }
    return 0;
}

static PyObject *fields_new(const char *data, Py_ssize_t len, Py_ssize_t n) {
    FieldsObject *f = PyObject_NewVar(FieldsObject, &FieldsType, len);
    if (f == NULL) return NULL;
    memcpy(f->data, data, (size_t)len);
    f->n = n;
    return (PyObject *)f;
}

typedef struct {
    const char *key;
    Py_ssize_t nkey;
    PyObject *found;
} Lookup;

static int lookup_each(const char *name, Py_ssize_t nn, const char *value, Py_ssize_t nv,
                       void *arg) {
    Lookup *l = arg;
    if (nn != l->nkey || memcmp(name, l->key, (size_t)nn) != 0) return 0;
    l->found = PyUnicode_DecodeUTF8(value, nv, NULL);
    return l->found == NULL ? -1 : 1;
}

/* The value of `key`, a new reference; NULL with no error set when absent (a key that is
 * not a str, or has no UTF-8 form, is absent, as from a dict of field names). */
static PyObject *fields_lookup(FieldsObject *f, PyObject *key) {
    if (!PyUnicode_Check(key)) return NULL;
    Lookup l = {NULL, 0, NULL};
    l.key = PyUnicode_AsUTF8AndSize(key, &l.nkey);
    if (l.key == NULL) {
        PyErr_Clear(); /* a lone surrogate: no field is named so */
        return NULL;
    }
    if (fields_each(f, lookup_each, &l) < 0) return NULL;
    return l.found;
}

static PyObject *fields_subscript(PyObject *self, PyObject *key) {
    PyObject *value = fields_lookup((FieldsObject *)self, key);
    if (value == NULL && !PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
    return value;
}

static int fields_contains(PyObject *self, PyObject *key) {
    PyObject *value = fields_lookup((FieldsObject *)self, key);
    if (value == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_DECREF(value);
    return 1;
}

static Py_ssize_t fields_length(PyObject *self) { return ((FieldsObject *)self)->n; }

enum { WANT_KEYS, WANT_VALUES, WANT_ITEMS };
typedef struct {
    PyObject *out;
    int want;
} Listing;

static int list_each(const char *name, Py_ssize_t nn, const char *value, Py_ssize_t nv,
                     void *arg) {
    Listing *l = arg;
    PyObject *item;
    if (l->want == WANT_KEYS) {
        item = PyUnicode_DecodeUTF8(name, nn, NULL);
    } else if (l->want == WANT_VALUES) {
        item = PyUnicode_DecodeUTF8(value, nv, NULL);
    } else {
        PyObject *k = PyUnicode_DecodeUTF8(name, nn, NULL);
        PyObject *v = k == NULL ? NULL : PyUnicode_DecodeUTF8(value, nv, NULL);
        item = v == NULL ? NULL : PyTuple_Pack(2, k, v);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    if (item == NULL) return -1;
    int rc = PyList_Append(l->out, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *fields_list(PyObject *self, int want) {
    Listing l = {PyList_New(0), want};
    if (l.out == NULL) return NULL;
    if (fields_each((FieldsObject *)self, list_each, &l) < 0) {
        Py_DECREF(l.out);
        return NULL;
    }
    return l.out;
}

static PyObject *fields_keys(PyObject *self, PyObject *unused) { return fields_list(self, WANT_KEYS); }
static PyObject *fields_values(PyObject *self, PyObject *unused) {
    return fields_list(self, WANT_VALUES);
}
static PyObject *fields_items(PyObject *self, PyObject *unused) {
    return fields_list(self, WANT_ITEMS);
}

/* The same fields as a dict. */
static PyObject *fields_dict(PyObject *self) {
    PyObject *items = fields_list(self, WANT_ITEMS);
    if (items == NULL) return NULL;
    PyObject *out = PyDict_New();
    if (out != NULL && PyDict_MergeFromSeq2(out, items, 1) < 0) Py_CLEAR(out);
    Py_DECREF(items);
    return out;
}

static PyObject *fields_get(PyObject *self, PyObject *args) {
    PyObject *key, *otherwise = Py_None;
    if (!PyArg_UnpackTuple(args, "get", 1, 2, &key, &otherwise)) return NULL;
    PyObject *value = fields_lookup((FieldsObject *)self, key);
    if (value != NULL || PyErr_Occurred()) return value;
    return Py_NewRef(otherwise);
}

static PyObject *fields_iter(PyObject *self) {
    PyObject *names = fields_list(self, WANT_KEYS);
    if (names == NULL) return NULL;
    PyObject *it = PyObject_GetIter(names);
    Py_DECREF(names);
    return it;
}

static PyObject *fields_richcompare(PyObject *self, PyObject *other, int op) {
    if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
    if (Py_IS_TYPE(other, &FieldsType)) {
        FieldsObject *a = (FieldsObject *)self, *b = (FieldsObject *)other;
        int same = Py_SIZE(a) == Py_SIZE(b) && memcmp(a->data, b->data, (size_t)Py_SIZE(a)) == 0;
        return PyBool_FromLong(op == Py_EQ ? same : !same);
    }
    if (!PyDict_Check(other)) Py_RETURN_NOTIMPLEMENTED;
    PyObject *mine = fields_dict(self);
    if (mine == NULL) return NULL;
    PyObject *result = PyObject_RichCompare(mine, other, op);
    Py_DECREF(mine);
    return result;
}

static PyObject *fields_repr(PyObject *self) {
    PyObject *mine = fields_dict(self);
    if (mine == NULL) return NULL;
    PyObject *text = PyUnicode_FromFormat("Fields(%R)", mine);
    Py_DECREF(mine);
    return text;
}

static PyObject *fields_reduce(PyObject *self, PyObject *unused) {
    PyObject *mine = fields_dict(self);
    if (mine == NULL) return NULL;
    return Py_BuildValue("O(N)", (PyObject *)&PyDict_Type, mine);
}

static PyObject *fields_resp(PyObject *self, PyObject *unused) {
    FieldsObject *f = (FieldsObject *)self;
    return PyBytes_FromStringAndSize(f->data, Py_SIZE(f));
}

static PyMethodDef fields_methods[] = {
    {"keys", fields_keys, METH_NOARGS, "The field names, in order (a list)."},
    {"values", fields_values, METH_NOARGS, "The values, in order (a list)."},
    {"items", fields_items, METH_NOARGS, "The (name, value) pairs, in order (a list)."},
    {"get", fields_get, METH_VARARGS, "get(name, default=None)"},
    {"resp", fields_resp, METH_NOARGS, "The pairs as RESP bulk strings, as HSET sends them."},
    {"__reduce__", fields_reduce, METH_NOARGS, "Pickles as the dict of the fields."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods fields_as_mapping = {fields_length, fields_subscript, NULL};
static PySequenceMethods fields_as_sequence = {.sq_contains = fields_contains};

static PyTypeObject FieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dataflow.core._native.Fields",
    .tp_basicsize = offsetof(FieldsObject, data),
    .tp_itemsize = 1,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A rendered key's fields: a read-only mapping of name to text, held as the "
              "RESP of its HSET's pairs.",
    .tp_as_mapping = &fields_as_mapping,
    .tp_as_sequence = &fields_as_sequence,
    .tp_iter = fields_iter,
    .tp_richcompare = fields_richcompare,
    .tp_repr = fields_repr,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_methods = fields_methods,
};

/* A key's fields while they are rendered: the pairs, in a buffer large enough for any
 * family's (at most 16 pairs of a name under 32 bytes and a value under 40). */
#define RENDER_BYTES 2048
typedef struct {
    char data[RENDER_BYTES];
    Py_ssize_t len, n;
} Rendering;

static void put_pair(Rendering *r, int field, const char *value, int nv) {
    char *at = r->data + r->len;
    memcpy(at, name_bulks[field], (size_t)name_bulk_len[field]);
    at += name_bulk_len[field];
    *at++ = '$';
    at += format_int(nv, at);
    *at++ = '\r';
    *at++ = '\n';
    memcpy(at, value, (size_t)nv);
    at += nv;
    *at++ = '\r';
    *at++ = '\n';
    r->len = at - r->data;
    r->n++;
}

static int put_int(Rendering *r, int field, int64_t value) {
    char text[24];
    put_pair(r, field, text, format_int(value, text));
    return 0;
}

/* repr(value) into `out` (at least 32 bytes), as CPython's float.__repr__ writes it: the
 * shortest digits that read back as `value` (Ryu's, the same digits as CPython's dtoa mode 0),
 * in fixed notation with at least one decimal when the decimal point falls within
 * [-4, 16] digits of them, else as d[.ddd]e±XX. inf and nan are handed to CPython.
 * Returns the length, or -1 for CPython's own formatter. */
static int format_repr(double value, char *out) {
    uint64_t bits = double_to_bits(value);
    int negative = (int)(bits >> 63);
    uint64_t mantissa = bits & ((1ull << DOUBLE_MANTISSA_BITS) - 1);
    uint32_t exponent = (uint32_t)((bits >> DOUBLE_MANTISSA_BITS) & 0x7ffu);
    if (exponent == 0x7ffu) return -1; /* inf, nan */
    int len = 0;
    if (negative) out[len++] = '-';
    if (exponent == 0 && mantissa == 0) {
        memcpy(out + len, "0.0", 3);
        return len + 3;
    }
    floating_decimal_64 v;
    if (d2d_small_int(mantissa, exponent, &v)) {
        for (;;) { /* small integers: move trailing zeros into the exponent */
            uint64_t q = div10(v.mantissa);
            if ((uint32_t)v.mantissa - 10 * (uint32_t)q != 0) break;
            v.mantissa = q;
            ++v.exponent;
        }
    } else {
        v = d2d(mantissa, exponent);
    }
    char digits[20] = {0};
    int n = 0;
    for (uint64_t m = v.mantissa; m; m /= 10) digits[n++] = (char)('0' + m % 10);
    for (int i = 0; i < n / 2; i++) { /* most significant first */
        char t = digits[i];
        digits[i] = digits[n - 1 - i];
        digits[n - 1 - i] = t;
    }
    int point = n + v.exponent; /* value = 0.digits × 10^point */
    if (point > -4 && point <= 16) {
        if (point <= 0) {
            out[len++] = '0';
            out[len++] = '.';
            for (int i = 0; i < -point; i++) out[len++] = '0';
            memcpy(out + len, digits, (size_t)n);
            return len + n;
        }
        if (point >= n) {
            memcpy(out + len, digits, (size_t)n);
            len += n;
            for (int i = n; i < point; i++) out[len++] = '0';
            memcpy(out + len, ".0", 2);
            return len + 2;
        }
        memcpy(out + len, digits, (size_t)point);
        len += point;
        out[len++] = '.';
        memcpy(out + len, digits + point, (size_t)(n - point));
        return len + (n - point);
    }
    out[len++] = digits[0];
    if (n > 1) {
        out[len++] = '.';
        memcpy(out + len, digits + 1, (size_t)(n - 1));
        len += n - 1;
    }
    int e = point - 1;
    out[len++] = 'e';
    out[len++] = e < 0 ? '-' : '+';
    if (e < 0) e = -e;
    if (e < 10) out[len++] = '0';
    return len + format_int(e, out + len);
}

/* repr(value), as CPython's float.__repr__ writes it. */
static int put_float(Rendering *r, int field, double value) {
    char buffer[32];
    int n = format_repr(value, buffer);
    if (n >= 0) {
        put_pair(r, field, buffer, n);
        return 0;
    }
    char *text = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) return -1;
    put_pair(r, field, text, (int)strlen(text)); /* inf, nan: a few bytes */
    PyMem_Free(text);
    return 0;
}

/* Prior.rate: (successes + alpha) / (trials + alpha + beta). */
static inline double rate(const Params *p, int family, double successes, double trials) {
    return (successes + p->alpha[family]) / (trials + p->alpha[family] + p->beta[family]);
}

/* counters.totals; 0, or 1 when a window sum does not fit an int64 (the caller hands the key
 * to the reference). */
static int window_sums(const int64_t *s, Py_ssize_t len, const Layout *layout, int64_t as_of_day,
                       int64_t as_of_ms, int64_t *last_7d, int64_t *last_30d, double *decayed) {
    int n = layout->counts, m = layout->n_decayed, width = layout->width;
    for (int i = 0; i < n; i++) last_7d[i] = last_30d[i] = 0;
    for (int j = 0; j < m; j++) decayed[j] = 0.0;
    int64_t first_30d = as_of_day - WINDOW_30D, first_7d = as_of_day - WINDOW_7D;
    for (Py_ssize_t pos = 1; pos + width <= len; pos += width) {
        int64_t day = s[pos];
        if (day <= first_30d || day > as_of_day) continue;
        const int64_t *c = s + pos + 1;
        for (int i = 0; i < n; i++) {
            if (__builtin_add_overflow(last_30d[i], c[i], &last_30d[i])) return 1;
            if (day > first_7d && __builtin_add_overflow(last_7d[i], c[i], &last_7d[i]))
                return 1;
        }
        if (m) {
            double factor = exp2((double)(-(as_of_ms - day * DAY_MS)) / (double)HALF_LIFE_MS) /
                            WEIGHT_SCALE;
            for (int j = 0; j < m; j++) {
                int64_t w = c[n + j];
                if (w) decayed[j] += (double)w * factor;
            }
        }
    }
    return 0;
}

static inline int family_of(PyObject *suffix) {
    if (!PyUnicode_Check(suffix) || PyUnicode_GET_LENGTH(suffix) < 3) return -1;
    int kind = PyUnicode_KIND(suffix);
    const void *data = PyUnicode_DATA(suffix);
    Py_UCS4 a = PyUnicode_READ(kind, data, 0), b = PyUnicode_READ(kind, data, 1),
            c = PyUnicode_READ(kind, data, 2);
    if (a == 'd' && b == 'o' && c == 'c') return DOC;
    if (a == 'q' && b == 'd' && c == ':') return QD;
    if (a == 'a' && b == 'c') {
        if (c == ':') return AC;
        if (c == 'q') return ACQ;
    }
    return -1;
}

/* The fields of one key, or NULL with no error set when its sums overflow an int64. */
static PyObject *render_key(int family, PyObject *state, int64_t *as_of_at, int at_least_newest,
                            const Layout *table, const Params *p) {
    Py_buffer view;
    if (get_state_buffer(state, &view) < 0) return NULL;
    if (at_least_newest) { /* FeatureShard.flush: max(the key's newest event, day start) */
        if (view.len < 8) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "an empty key state");
            return NULL;
        }
        int64_t newest = ((const int64_t *)view.buf)[0];
        if (newest > *as_of_at) *as_of_at = newest;
    }
    int64_t as_of = *as_of_at;
    const Layout *layout = &table[family];
    int64_t w7[MAX_COUNTS], w30[MAX_COUNTS];
    double d[MAX_DECAYED];
    int overflowed = window_sums((const int64_t *)view.buf, view.len / 8, layout,
                                 floor_div(as_of, DAY_MS), as_of, w7, w30, d);
    PyBuffer_Release(&view);
    if (overflowed) return NULL;
    Rendering rendering;
    Rendering *out = &rendering;
    out->len = out->n = 0;
    int bad = 0;
    if (family == DOC || family == QD) {
        if (layout->counts != 4 || layout->n_decayed != 2) goto layout_error;
        double expected30 = (double)w30[3] / EXPECTED_SCALE;
        bad |= put_int(out, F_IMPRESSIONS_7D, w7[0]);
        bad |= put_int(out, F_CLICKS_7D, w7[1]);
        bad |= put_int(out, F_IMPRESSIONS_30D, w30[0]);
        bad |= put_int(out, F_CLICKS_30D, w30[1]);
        bad |= put_int(out, F_LONG_CLICKS_30D, w30[2]);
        bad |= put_float(out, F_CTR_7D, rate(p, family, (double)w7[1], (double)w7[0]));
        bad |= put_float(out, F_CTR_30D, rate(p, family, (double)w30[1], (double)w30[0]));
        bad |= put_float(out, F_IMPRESSIONS_DECAY, d[0]);
        bad |= put_float(out, F_CLICKS_DECAY, d[1]);
        bad |= put_float(out, F_CTR_DECAY, rate(p, family, d[1], d[0]));
        bad |= put_int(out, F_AS_OF, as_of);
        if (family == DOC) {
            bad |= put_float(out, F_POPULARITY_7D,
                             p->weight_click * (double)w7[1] +
                                 p->weight_impression * (double)w7[0] +
                                 p->weight_long_click * (double)w7[2]);
            bad |= put_float(out, F_POPULARITY_30D,
                             p->weight_click * (double)w30[1] +
                                 p->weight_impression * (double)w30[0] +
                                 p->weight_long_click * (double)w30[2]);
        }
        bad |= put_float(out, F_EXPECTED_CLICKS_30D, expected30);
        bad |= put_float(out, F_COEC_30D,
                         ((double)w30[1] + p->coec_prior) / (expected30 + p->coec_prior));
    } else if (family == AC) {
        if (layout->counts != 2) goto layout_error;
        bad |= put_int(out, F_IMPRESSIONS_7D, w7[0]);
        bad |= put_int(out, F_SELECTS_7D, w7[1]);
        bad |= put_int(out, F_IMPRESSIONS_30D, w30[0]);
        bad |= put_int(out, F_SELECTS_30D, w30[1]);
        bad |= put_float(out, F_SELECT_RATE_7D, rate(p, AC, (double)w7[1], (double)w7[0]));
        bad |= put_float(out, F_SELECT_RATE_30D, rate(p, AC, (double)w30[1], (double)w30[0]));
        bad |= put_int(out, F_AS_OF, as_of);
    } else {
        if (layout->counts != 3) goto layout_error;
        bad |= put_int(out, F_SELECTS_7D, w7[0]);
        bad |= put_int(out, F_SEARCHED_7D, w7[1]);
        bad |= put_int(out, F_CLICKED_7D, w7[2]);
        bad |= put_int(out, F_SELECTS_30D, w30[0]);
        bad |= put_int(out, F_SEARCHED_30D, w30[1]);
        bad |= put_int(out, F_CLICKED_30D, w30[2]);
        bad |= put_float(out, F_SEARCH_RATE_30D, rate(p, ACQ, (double)w30[1], (double)w30[0]));
        bad |= put_float(out, F_CLICK_RATE_30D, rate(p, ACQ, (double)w30[2], (double)w30[0]));
        bad |= put_int(out, F_AS_OF, as_of);
    }
    if (bad) return NULL;
    return fields_new(out->data, out->len, out->n);
layout_error:
    PyErr_SetString(PyExc_ValueError, "layouts do not match the families' fields");
    return NULL;
}

/* The fields of one key, through the reference when the compiled sums cannot hold them. */
static PyObject *render_or_fallback(int family, PyObject *state, int64_t *as_of,
                                    int at_least_newest, const Layout *table, const Params *p,
                                    PyObject *fallback) {
    PyObject *fields = render_key(family, state, as_of, at_least_newest, table, p);
    if (fields != NULL || PyErr_Occurred()) return fields;
    return PyObject_CallFunction(fallback, "iOL", family, state, (long long)*as_of);
}

/* fields_for(family, state, as_of, layouts, cparams, fallback) -> dict */
static PyObject *py_fields_for(PyObject *self, PyObject *args) {
    int family;
    PyObject *state, *layouts, *cparams, *fallback;
    long long as_of;
    if (!PyArg_ParseTuple(args, "iOLOOO", &family, &state, &as_of, &layouts, &cparams, &fallback))
        return NULL;
    Layout table[N_FAMILIES];
    Params p;
    if (parse_layouts(layouts, table) < 0 || parse_params(cparams, &p) < 0) return NULL;
    if (family < 0 || family >= N_FAMILIES) {
        PyErr_SetString(PyExc_ValueError, "no such family");
        return NULL;
    }
    int64_t at = as_of;
    return render_or_fallback(family, state, &at, 0, table, &p, fallback);
}

/* render(keys, suffixes, day_start, layouts, cparams, fallback, writes, as_of=None) -> None
 *
 * FeatureShard.flush's loop: appends (suffix, fields) to `writes` for every suffix, each
 * rendered at max(its newest event, day_start), and that `as_of` to the list `as_of` when
 * one is given. */
static PyObject *py_render(PyObject *self, PyObject *args) {
    PyObject *keys, *suffixes, *layouts, *cparams, *fallback, *writes, *as_ofs = Py_None;
    long long day_start;
    if (!PyArg_ParseTuple(args, "O!OLOOOO!|O", &PyDict_Type, &keys, &suffixes, &day_start,
                          &layouts, &cparams, &fallback, &PyList_Type, &writes, &as_ofs))
        return NULL;
    if (as_ofs != Py_None && !PyList_Check(as_ofs)) {
        PyErr_SetString(PyExc_TypeError, "as_of must be a list or None");
        return NULL;
    }
    Layout table[N_FAMILIES];
    Params p;
    if (parse_layouts(layouts, table) < 0 || parse_params(cparams, &p) < 0) return NULL;
    PyObject *it = PyObject_GetIter(suffixes);
    if (it == NULL) return NULL;
    PyObject *suffix;
    while ((suffix = PyIter_Next(it)) != NULL) {
        PyObject *state = PyDict_GetItemWithError(keys, suffix); /* borrowed */
        int family = family_of(suffix);
        if (state == NULL || family < 0) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, suffix);
            Py_DECREF(suffix);
            Py_DECREF(it);
            return NULL;
        }
        Py_INCREF(state); /* held across a call of the reference */
        int64_t as_of = day_start;
        PyObject *fields = render_or_fallback(family, state, &as_of, 1, table, &p, fallback);
        Py_DECREF(state);
        if (fields != NULL && as_ofs != Py_None) {
            PyObject *at = PyLong_FromLongLong((long long)as_of);
            if (at == NULL || PyList_Append(as_ofs, at) < 0) Py_CLEAR(fields);
            Py_XDECREF(at);
        }
        PyObject *write = fields == NULL ? NULL : PyTuple_Pack(2, suffix, fields);
        Py_XDECREF(fields);
        Py_DECREF(suffix);
        if (write == NULL || PyList_Append(writes, write) < 0) {
            Py_XDECREF(write);
            Py_DECREF(it);
            return NULL;
        }
        Py_DECREF(write);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* ---- sinks.redis: RESP of a chunk of writes -------------------------------------------- */

/* pack_writes(prefix, writes, ttl, seconds) -> (bytes, replies)
 *
 * `HSET <prefix>:<suffix> field value ...` per (suffix, fields), then `EXPIRE key seconds`
 * when the suffix is in `ttl`; `DEL key` per (suffix, None). */
static PyObject *py_pack_writes(PyObject *self, PyObject *args) {
    PyObject *prefix, *writes, *ttl;
    long long seconds;
    if (!PyArg_ParseTuple(args, "UOOL", &prefix, &writes, &ttl, &seconds)) return NULL;
    Py_ssize_t nprefix;
    const char *prefix_text = PyUnicode_AsUTF8AndSize(prefix, &nprefix);
    if (prefix_text == NULL) return NULL;
    char ttl_text[24];
    int nttl = format_int(seconds, ttl_text);
    PyObject *fast = PySequence_Fast(writes, "writes must be a sequence");
    if (fast == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Buffer b = {NULL, 0, 0};
    /* the key is `prefix:` then the suffix: keep `prefix:` in one piece */
    char *head = PyMem_Malloc((size_t)nprefix + 1);
    if (head == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    memcpy(head, prefix_text, (size_t)nprefix);
    head[nprefix] = ':';
    long long replies = 0;
    int is_set = PyAnySet_Check(ttl);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *w = items[k];
        if (!PyTuple_Check(w) || PyTuple_GET_SIZE(w) != 2) {
            PyErr_SetString(PyExc_TypeError, "a write is (suffix, fields or None)");
            goto fail;
        }
        PyObject *suffix = PyTuple_GET_ITEM(w, 0), *fields = PyTuple_GET_ITEM(w, 1);
        Py_ssize_t nsuffix;
        const char *suffix_text = utf8(suffix, &nsuffix);
        if (suffix_text == NULL) goto fail;
        char line[48];
        if (fields == Py_None) {
            if (put(&b, "*2\r\n$3\r\nDEL\r\n", 13) < 0 ||
                put_bulk(&b, head, nprefix + 1, suffix_text, nsuffix) < 0)
                goto fail;
            replies++;
            continue;
        }
        int rendered = Py_IS_TYPE(fields, &FieldsType);
        if (!rendered && !PyDict_Check(fields)) {
            PyErr_SetString(PyExc_TypeError, "fields must be a dict or Fields");
            goto fail;
        }
        Py_ssize_t pairs = rendered ? ((FieldsObject *)fields)->n : PyDict_GET_SIZE(fields);
        line[0] = '*';
        int nl = 1 + format_int((int64_t)(2 + 2 * pairs), line + 1);
        memcpy(line + nl, "\r\n$4\r\nHSET\r\n", 12);
        nl += 12;
        if (put(&b, line, (size_t)nl) < 0 || put_bulk(&b, head, nprefix + 1, suffix_text, nsuffix) < 0)
            goto fail;
        Py_ssize_t pos = 0;
        PyObject *name, *value;
        if (rendered && put(&b, ((FieldsObject *)fields)->data, (size_t)Py_SIZE(fields)) < 0)
            goto fail;
        while (!rendered && PyDict_Next(fields, &pos, &name, &value)) {
            Py_ssize_t nn, nv;
            const char *name_text = utf8(name, &nn);
            if (name_text == NULL) goto fail;
            const char *value_text = utf8(value, &nv);
            if (value_text == NULL) goto fail;
            if (put_bulk(&b, name_text, nn, NULL, 0) < 0 || put_bulk(&b, value_text, nv, NULL, 0) < 0)
                goto fail;
        }
        replies++;
        int in_ttl = is_set ? PySet_Contains(ttl, suffix) : PySequence_Contains(ttl, suffix);
        if (in_ttl < 0) goto fail;
        if (in_ttl) {
            if (put(&b, "*3\r\n$6\r\nEXPIRE\r\n", 16) < 0 ||
                put_bulk(&b, head, nprefix + 1, suffix_text, nsuffix) < 0 ||
                put_bulk(&b, ttl_text, nttl, NULL, 0) < 0)
                goto fail;
            replies++;
        }
    }
    Py_DECREF(fast);
    PyMem_Free(head);
    PyObject *data = PyBytes_FromStringAndSize(b.data ? b.data : "", (Py_ssize_t)b.len);
    PyMem_Free(b.data);
    if (data == NULL) return NULL;
    PyObject *result = Py_BuildValue("NL", data, replies);
    return result;
fail:
    Py_DECREF(fast);
    PyMem_Free(head);
    PyMem_Free(b.data);
    return NULL;
}

/* ---- flow.FanOut: events to counter updates, grouped by state shard --------------------- */

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* zlib.crc32 (CRC-32, IEEE 802.3). */
static uint32_t crc32_of(const char *data, Py_ssize_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++) c = crc_table[(c ^ (uint8_t)data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* Whether keys.enc leaves `text` as it is: every character in [A-Za-z0-9_.~-]. */
static int unreserved(PyObject *text) {
    if (!PyUnicode_IS_ASCII(text)) return 0;
    const unsigned char *c = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = c[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '~' || ch == '-'))
            return 0;
    }
    return 1;
}

/* `a + b + c` for ASCII strings (key suffixes are ASCII: percent-encoded ids, hex hashes). */
static PyObject *concat3(const char *a, Py_ssize_t na, PyObject *b, const char *c, Py_ssize_t nc,
                         PyObject *d) {
    if (!PyUnicode_IS_ASCII(b) || (d != NULL && !PyUnicode_IS_ASCII(d))) {
        PyErr_SetString(PyExc_ValueError, "a key part is not ASCII");
        return NULL;
    }
    Py_ssize_t nb = PyUnicode_GET_LENGTH(b), nd = d == NULL ? 0 : PyUnicode_GET_LENGTH(d);
    PyObject *out = PyUnicode_New(na + nb + nc + nd, 127);
    if (out == NULL) return NULL;
    char *at = (char *)PyUnicode_1BYTE_DATA(out);
    memcpy(at, a, (size_t)na);
    memcpy(at + na, PyUnicode_1BYTE_DATA(b), (size_t)nb);
    memcpy(at + na + nb, c, (size_t)nc);
    if (d != NULL) memcpy(at + na + nb + nc, PyUnicode_1BYTE_DATA(d), (size_t)nd);
    return out;
}

typedef struct {
    Py_ssize_t shards;
    PyObject **lists;   /* per shard, NULL until it has an update */
    Py_ssize_t *order;  /* shards in order of their first update */
    Py_ssize_t used;
} Groups;

/* Append `update` (a new reference, stolen) to the list of its key's shard. */
static int group(Groups *g, PyObject *update, PyObject *suffix) {
    if (update == NULL) return -1;
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(suffix, &n);
    if (text == NULL) {
        Py_DECREF(update);
        return -1;
    }
    Py_ssize_t idx = (Py_ssize_t)(crc32_of(text, n) % (uint32_t)g->shards);
    if (g->lists[idx] == NULL) {
        g->lists[idx] = PyList_New(0);
        if (g->lists[idx] == NULL) {
            Py_DECREF(update);
            return -1;
        }
        g->order[g->used++] = idx;
    }
    int rc = PyList_Append(g->lists[idx], update);
    Py_DECREF(update);
    return rc;
}

/* One search impression: each distinct doc once, at the position of its first occurrence,
 * a doc update and (with a query) a query-doc update (families.updates_for). */
static int impression_updates(Groups *g, PyObject *event, PyObject *by_position, PyObject *qhash_of,
                              PyObject *enc, PyObject *doc_family, PyObject *qd_family) {
    PyObject *ts = PyObject_GetAttrString(event, "ts");
    PyObject *query = ts == NULL ? NULL : PyObject_GetAttrString(event, "query");
    PyObject *doc_ids = query == NULL ? NULL : PyObject_GetAttrString(event, "doc_ids");
    PyObject *qhash = NULL, *seen = NULL;
    int rc = -1;
    if (doc_ids == NULL) goto done;
    if (!PyTuple_Check(doc_ids) || !PyTuple_Check(by_position) || !PyTuple_GET_SIZE(by_position)) {
        PyErr_SetString(PyExc_TypeError, "doc_ids and by_position must be tuples");
        goto done;
    }
    qhash = PyObject_CallOneArg(qhash_of, query);
    if (qhash == NULL) goto done;
    if (qhash != Py_None && !PyUnicode_Check(qhash)) {
        PyErr_SetString(PyExc_TypeError, "a query hash must be str or None");
        goto done;
    }
    seen = PySet_New(NULL);
    if (seen == NULL) goto done;
    Py_ssize_t last = PyTuple_GET_SIZE(by_position) - 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(doc_ids); i++) {
        PyObject *doc_id = PyTuple_GET_ITEM(doc_ids, i);
        int known = PySet_Contains(seen, doc_id);
        if (known < 0) goto done;
        if (known) continue;
        if (PySet_Add(seen, doc_id) < 0) goto done;
        PyObject *counts = PyTuple_GET_ITEM(by_position, i < last ? i : last);
        PyObject *component;
        if (PyUnicode_Check(doc_id) && unreserved(doc_id)) {
            component = Py_NewRef(doc_id);
        } else {
            component = PyObject_CallOneArg(enc, doc_id);
            if (component == NULL) goto done;
            if (!PyUnicode_Check(component)) {
                Py_DECREF(component);
                PyErr_SetString(PyExc_TypeError, "enc must return str");
                goto done;
            }
        }
        PyObject *suffix = concat3("doc:", 4, component, "", 0, NULL);
        if (suffix == NULL) {
            Py_DECREF(component);
            goto done;
        }
        int bad = group(g, PyTuple_Pack(4, doc_family, suffix, ts, counts), suffix);
        Py_DECREF(suffix);
        if (!bad && qhash != Py_None) {
            suffix = concat3("qd:", 3, qhash, ":", 1, component);
            bad = suffix == NULL ? -1 : group(g, PyTuple_Pack(4, qd_family, suffix, ts, counts), suffix);
            Py_XDECREF(suffix);
        }
        Py_DECREF(component);
        if (bad) goto done;
    }
    rc = 0;
done:
    Py_XDECREF(ts);
    Py_XDECREF(query);
    Py_XDECREF(doc_ids);
    Py_XDECREF(qhash);
    Py_XDECREF(seen);
    return rc;
}

/* fan_out(events, shards, impression_type, by_position, qhash_of, enc, updates_for)
 *   -> [(str(shard), [update, ...]), ...]
 *
 * flow.FanOut: the counter updates of every event (search impressions here, the other
 * types through `updates_for(event)`), grouped by the state shard of their key
 * (flow.shard_of: CRC-32 of the suffix modulo `shards`), shards in order of their first
 * update and updates in event order within each. */
static PyObject *py_fan_out(PyObject *self, PyObject *args) {
    PyObject *events, *impression_type, *by_position, *qhash_of, *enc, *updates_for;
    Py_ssize_t shards;
    if (!PyArg_ParseTuple(args, "OnOOOOO", &events, &shards, &impression_type, &by_position,
                          &qhash_of, &enc, &updates_for))
        return NULL;
    if (shards < 1 || shards > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "shards out of range");
        return NULL;
    }
    Groups g = {shards, PyMem_Calloc((size_t)shards, sizeof(PyObject *)),
                PyMem_Calloc((size_t)shards, sizeof(Py_ssize_t)), 0};
    PyObject *doc_family = PyLong_FromLong(DOC), *qd_family = PyLong_FromLong(QD);
    PyObject *it = PyObject_GetIter(events), *out = NULL, *event;
    if (g.lists == NULL || g.order == NULL || it == NULL || doc_family == NULL ||
        qd_family == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    while ((event = PyIter_Next(it)) != NULL) {
        int bad;
        if (Py_TYPE(event) == (PyTypeObject *)impression_type) {
            bad = impression_updates(&g, event, by_position, qhash_of, enc, doc_family, qd_family);
        } else {
            PyObject *updates = PyObject_CallOneArg(updates_for, event);
            PyObject *fast = updates == NULL ? NULL : PySequence_Fast(updates, "updates");
            bad = fast == NULL;
            for (Py_ssize_t k = 0; !bad && k < PySequence_Fast_GET_SIZE(fast); k++) {
                PyObject *u = PySequence_Fast_GET_ITEM(fast, k);
                if (!PyTuple_Check(u) || PyTuple_GET_SIZE(u) != 4) {
                    PyErr_SetString(PyExc_TypeError, "an update is (family, suffix, ts, counts)");
                    bad = 1;
                    break;
                }
                bad = group(&g, Py_NewRef(u), PyTuple_GET_ITEM(u, 1)) < 0;
            }
            Py_XDECREF(fast);
            Py_XDECREF(updates);
        }
        Py_DECREF(event);
        if (bad) goto done;
    }
    if (PyErr_Occurred()) goto done;
    out = PyList_New(g.used);
    if (out == NULL) goto done;
    for (Py_ssize_t k = 0; k < g.used; k++) {
        Py_ssize_t idx = g.order[k];
        PyObject *name = PyUnicode_FromFormat("%zd", idx);
        PyObject *pair = name == NULL ? NULL : PyTuple_Pack(2, name, g.lists[idx]);
        Py_XDECREF(name);
        if (pair == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, pair);
    }
done:
    if (g.lists != NULL)
        for (Py_ssize_t k = 0; k < g.used; k++) Py_XDECREF(g.lists[g.order[k]]);
    PyMem_Free(g.lists);
    PyMem_Free(g.order);
    Py_XDECREF(doc_family);
    Py_XDECREF(qd_family);
    Py_XDECREF(it);
    return out;
}

/* shard_of(suffix, shards) -> int: flow.shard_of. */
static PyObject *py_shard_of(PyObject *self, PyObject *args) {
    PyObject *suffix;
    Py_ssize_t shards;
    if (!PyArg_ParseTuple(args, "Un", &suffix, &shards)) return NULL;
    if (shards < 1) {
        PyErr_SetString(PyExc_ValueError, "shards out of range");
        return NULL;
    }
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(suffix, &n);
    if (text == NULL) return NULL;
    return PyLong_FromUnsignedLong(crc32_of(text, n) % (uint32_t)shards);
}

/* ---- events.decode: the common case of a valid event -------------------------------------- */

enum {
    K_TYPE, K_EVENT_ID, K_TS, K_SESSION_ID, K_QUERY, K_DOC_IDS, K_ORIGIN, K_CLOCK, K_DOC_ID,
    K_POSITION, K_DWELL_MS, K_PREFIX, K_CANDIDATES, K_CANDIDATE, N_NAMES
};
static const char *NAMES[N_NAMES] = {
    "type", "event_id", "ts", "session_id", "query", "doc_ids", "origin", "clock", "doc_id",
    "position", "dwell_ms", "prefix", "candidates", "candidate",
};
static PyObject *names[N_NAMES];
static const char *TYPE_NAMES[5] = {"search_impression", "click", "dwell", "ac_impression",
                                    "ac_select"};
static PyObject *empty_text, *empty_args;

/* The limits of events.py (contract §5); CONSTANTS exposes them for a test. */
#define MAX_EVENT_ID_CHARS 128
#define MAX_SESSION_ID_CHARS 128
#define MAX_TEXT_CHARS 1024
#define MAX_DOC_ID_BYTES 256
#define MAX_DOC_IDS 1000
#define MAX_CANDIDATES 50

/* Each check answers 1 (as events.py accepts it), 0 (let events.py decide: a rejection or an
 * unusual case) or -1 (an error). */

static int small_int(PyObject *value, long long minimum, long long *out) {
    if (!PyLong_CheckExact(value)) return 0; /* bool and float are not int */
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (v < minimum) return 0;
    *out = v;
    return 1;
}

static int text_of(PyObject *value, Py_ssize_t max_chars, int required) {
    if (value == NULL) return !required;
    return PyUnicode_CheckExact(value) && PyUnicode_GET_LENGTH(value) <= max_chars;
}

/* events._doc_id for ASCII ids (others go to events.py): 1..256 bytes, no control character. */
static int doc_id_ok(PyObject *value) {
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    if (n < 1 || n > MAX_DOC_ID_BYTES) return 0;
    const unsigned char *c = PyUnicode_1BYTE_DATA(value);
    for (Py_ssize_t i = 0; i < n; i++)
        if (c[i] < 0x20 || c[i] == 0x7f) return 0;
    return 1;
}

/* events._string_list: the list at `name` with 1..max_items items, else NULL (borrowed). */
static PyObject *list_field(PyObject *obj, int name, Py_ssize_t max_items) {
    PyObject *value = PyDict_GetItemWithError(obj, names[name]);
    if (value == NULL || !PyList_CheckExact(value) || PyList_GET_SIZE(value) < 1 ||
        PyList_GET_SIZE(value) > max_items)
        return NULL;
    return value;
}

static PyObject *field(PyObject *obj, int name) { /* borrowed, NULL when missing or null */
    PyObject *value = PyDict_GetItemWithError(obj, names[name]);
    return value == Py_None ? NULL : value;
}

/* A new instance of a frozen dataclass with its fields set, as its __init__ would. */
static PyObject *instance(PyObject *cls, const int *fields, PyObject **values, int n) {
    PyObject *event = PyBaseObject_Type.tp_new((PyTypeObject *)cls, empty_args, NULL);
    if (event == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        if (PyObject_GenericSetAttr(event, names[fields[i]], values[i]) < 0) {
            Py_DECREF(event);
            return NULL;
        }
    }
    return event;
}

/* event_from(obj, origin, clock, latest_ts, types) -> Event | None
 *
 * The event events.decode builds from a decoded JSON object, when it is a valid event of
 * the common shape (ASCII doc ids, ts at most `latest_ts`); None when events.py must decide
 * (every rejection, and the unusual cases), which it does with its own messages. */
static PyObject *py_event_from(PyObject *self, PyObject *args) {
    PyObject *obj, *types, *origin_in, *clock_in, *latest_in;
    long long origin, clock, latest;
    if (!PyArg_ParseTuple(args, "OOOOO!", &obj, &origin_in, &clock_in, &latest_in, &PyTuple_Type,
                          &types))
        return NULL;
    if (!PyDict_CheckExact(obj) || PyTuple_GET_SIZE(types) != 5) Py_RETURN_NONE;
    /* numbers past an int64 (never in practice) are events.py's to handle */
    if (!small_int(origin_in, LLONG_MIN, &origin) || !small_int(clock_in, LLONG_MIN, &clock) ||
        !small_int(latest_in, LLONG_MIN, &latest))
        Py_RETURN_NONE;
    PyObject *kind = field(obj, K_TYPE);
    if (kind == NULL || !PyUnicode_CheckExact(kind)) goto decline;
    int t = -1;
    for (int i = 0; i < 5; i++)
        if (PyUnicode_CompareWithASCIIString(kind, TYPE_NAMES[i]) == 0) t = i;
    if (t < 0) goto decline;
    /* _common */
    PyObject *event_id = field(obj, K_EVENT_ID);
    if (event_id == NULL || !PyUnicode_CheckExact(event_id) || PyUnicode_GET_LENGTH(event_id) < 1 ||
        PyUnicode_GET_LENGTH(event_id) > MAX_EVENT_ID_CHARS)
        goto decline;
    PyObject *ts_obj = PyDict_GetItemWithError(obj, names[K_TS]);
    long long ts;
    if (ts_obj == NULL || !small_int(ts_obj, 0, &ts) || ts > latest) goto decline;
    PyObject *session_id = field(obj, K_SESSION_ID);
    if (session_id != NULL && !text_of(session_id, MAX_SESSION_ID_CHARS, 1)) goto decline;
    PyObject *values[8] = {event_id, ts_obj, session_id ? session_id : Py_None};
    int fields[8] = {K_EVENT_ID, K_TS, K_SESSION_ID};
    PyObject *made = NULL, *owned = NULL; /* owned: a new object among values */
    PyObject *origin_obj = PyLong_FromLongLong(origin);
    PyObject *clock_obj = PyLong_FromLongLong(clock > ts ? clock : ts);
    if (origin_obj == NULL || clock_obj == NULL) goto fail;
    if (t == 0 || t == 1 || t == 2) { /* search_impression, click, dwell: query */
        PyObject *query = field(obj, K_QUERY);
        if (!text_of(query, MAX_TEXT_CHARS, 0)) goto decline_owned;
        values[3] = query ? query : empty_text;
        fields[3] = K_QUERY;
    }
    if (t == 0) {
        PyObject *raw = list_field(obj, K_DOC_IDS, MAX_DOC_IDS);
        if (raw == NULL) goto decline_owned;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(raw); i++)
            if (!doc_id_ok(PyList_GET_ITEM(raw, i))) goto decline_owned;
        owned = PyList_AsTuple(raw);
        if (owned == NULL) goto fail;
        values[4] = owned;
        fields[4] = K_DOC_IDS;
    } else if (t == 1 || t == 2) {
        PyObject *doc_id = PyDict_GetItemWithError(obj, names[K_DOC_ID]);
        if (doc_id == NULL || !doc_id_ok(doc_id)) goto decline_owned;
        values[4] = doc_id;
        fields[4] = K_DOC_ID;
        long long number;
        if (t == 1) {
            PyObject *position = field(obj, K_POSITION);
            if (position != NULL && !small_int(position, 1, &number)) goto decline_owned;
            values[5] = position ? position : Py_None;
            fields[5] = K_POSITION;
        } else {
            PyObject *dwell = PyDict_GetItemWithError(obj, names[K_DWELL_MS]);
            if (dwell == NULL || !small_int(dwell, 0, &number)) goto decline_owned;
            values[5] = dwell;
            fields[5] = K_DWELL_MS;
        }
    } else { /* ac_impression, ac_select: prefix */
        PyObject *prefix = field(obj, K_PREFIX);
        if (prefix == NULL || !text_of(prefix, MAX_TEXT_CHARS, 1)) goto decline_owned;
        values[3] = prefix;
        fields[3] = K_PREFIX;
        if (t == 3) {
            PyObject *raw = list_field(obj, K_CANDIDATES, MAX_CANDIDATES);
            if (raw == NULL) goto decline_owned;
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(raw); i++)
                if (!text_of(PyList_GET_ITEM(raw, i), MAX_TEXT_CHARS, 1)) goto decline_owned;
            owned = PyList_AsTuple(raw);
            if (owned == NULL) goto fail;
            values[4] = owned;
            fields[4] = K_CANDIDATES;
        } else {
            PyObject *candidate = field(obj, K_CANDIDATE);
            if (candidate == NULL || !text_of(candidate, MAX_TEXT_CHARS, 1)) goto decline_owned;
            values[4] = candidate;
            fields[4] = K_CANDIDATE;
        }
    }
    int n = (t == 1 || t == 2) ? 6 : 5;
    values[n] = origin_obj;
    fields[n] = K_ORIGIN;
    values[n + 1] = clock_obj;
    fields[n + 1] = K_CLOCK;
    made = instance(PyTuple_GET_ITEM(types, t), fields, values, n + 2);
fail:
    Py_XDECREF(owned);
    Py_XDECREF(origin_obj);
    Py_XDECREF(clock_obj);
    return made;
decline_owned:
    Py_XDECREF(owned);
    Py_XDECREF(origin_obj);
    Py_XDECREF(clock_obj);
decline:
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* float_repr(value) -> str: repr(value), by the compiled formatter. */
static PyObject *py_float_repr(PyObject *self, PyObject *arg) {
    double value = PyFloat_AsDouble(arg);
    if (value == -1.0 && PyErr_Occurred()) return NULL;
    char buffer[32];
    int n = format_repr(value, buffer);
    if (n < 0) return PyObject_Repr(arg);
    return PyUnicode_FromStringAndSize(buffer, n);
}

/* ---- module ---------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"add", py_add, METH_VARARGS,
     "add(state | None, layouts, family, ts, counts) -> state: counters.add."},
    {"apply", py_apply, METH_VARARGS,
     "apply(updates, keys, dirty, created, deleted, layouts, clock, late_before) -> "
     "(clock, late_before, late): FeatureShard.step's loop over one batch of updates."},
    {"fields_for", py_fields_for, METH_VARARGS,
     "fields_for(family, state, as_of, layouts, cparams, fallback) -> Fields: "
     "families.fields_for."},
    {"render", py_render, METH_VARARGS,
     "render(keys, suffixes, day_start, layouts, cparams, fallback, writes, as_of=None): "
     "appends (suffix, fields) per suffix, and its as_of to the list as_of, as "
     "FeatureShard.flush does."},
    {"event_from", py_event_from, METH_VARARGS,
     "event_from(obj, origin, clock, latest_ts, types) -> Event | None: events.decode's event "
     "for a valid event of the common shape, None for events.py to decide."},
    {"float_repr", py_float_repr, METH_O,
     "float_repr(value) -> str: repr(value), by the formatter the renderer uses."},
    {"fan_out", py_fan_out, METH_VARARGS,
     "fan_out(events, shards, impression_type, by_position, qhash_of, enc, updates_for) -> "
     "[(str(shard), updates)]: flow.FanOut."},
    {"shard_of", py_shard_of, METH_VARARGS, "shard_of(suffix, shards) -> int: flow.shard_of."},
    {"pack_states", py_pack_states, METH_O,
     "pack_states(keys) -> bytes: counters.pack_states."},
    {"unpack_states", py_unpack_states, METH_O,
     "unpack_states(blob) -> dict: counters.unpack_states."},
    {"unpack_states_layout_4", py_unpack_states_layout_4, METH_O,
     "unpack_states_layout_4(blob) -> dict: counters.unpack_states_layout_4."},
    {"pack_writes", py_pack_writes, METH_VARARGS,
     "pack_writes(prefix, writes, ttl, seconds) -> (bytes, replies): the RESP of a chunk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dataflow.core._native",
    "Compiled per-key hot paths of the state core (pure-Python references in the package).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    crc_init();
    PyObject *array_module = PyImport_ImportModule("array");
    if (array_module == NULL) goto fail;
    zero_item = PyObject_CallMethod(array_module, "array", "s[i]", "q", 0);
    Py_DECREF(array_module);
    if (zero_item == NULL) goto fail;
    for (int i = 0; i < N_FIELDS; i++) {
        name_bulk_len[i] = snprintf(name_bulks[i], sizeof name_bulks[i], "$%d\r\n%s\r\n",
                                    (int)strlen(FIELD_NAMES[i]), FIELD_NAMES[i]);
    }
    if (PyType_Ready(&FieldsType) < 0) goto fail;
    Py_INCREF(&FieldsType);
    if (PyModule_AddObject(m, "Fields", (PyObject *)&FieldsType) < 0) {
        Py_DECREF(&FieldsType);
        goto fail;
    }
    for (int i = 0; i < N_NAMES; i++) {
        names[i] = PyUnicode_InternFromString(NAMES[i]);
        if (names[i] == NULL) goto fail;
    }
    empty_text = PyUnicode_InternFromString("");
    empty_args = PyTuple_New(0);
    if (empty_text == NULL || empty_args == NULL) goto fail;
    PyObject *constants = Py_BuildValue(
        "{s:L,s:L,s:d,s:d,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "DAY_MS", DAY_MS,
        "HALF_LIFE_MS", HALF_LIFE_MS, "WEIGHT_SCALE", WEIGHT_SCALE, "EXPECTED_SCALE",
        EXPECTED_SCALE, "WINDOW_7D", WINDOW_7D, "WINDOW_30D", WINDOW_30D, "RETENTION_DAYS",
        RETENTION_DAYS, "MAX_EVENT_ID_CHARS", MAX_EVENT_ID_CHARS, "MAX_SESSION_ID_CHARS",
        MAX_SESSION_ID_CHARS, "MAX_TEXT_CHARS", MAX_TEXT_CHARS, "MAX_DOC_ID_BYTES",
        MAX_DOC_ID_BYTES, "MAX_DOC_IDS", MAX_DOC_IDS, "MAX_CANDIDATES", MAX_CANDIDATES);
    if (constants == NULL || PyModule_AddObject(m, "CONSTANTS", constants) < 0) {
        Py_XDECREF(constants);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
