/* Native threads for a step's grammar work without Python's GIL (asyncllm/engine/native_grammar.py).

   A job is a list of rows, each one grammar matcher (an xgrammar tvm-ffi object): accept a token (when given),
   then fill the matcher's bitmask row with the tokens it allows next (when given a row; or an allow-all row for a
   grammar that ended). Worker threads take rows one at a time (so one slow mask does not hold a share of the
   others), calling xgrammar through tvm-ffi's C ABI; the last worker to finish opens the job's stream gate (the
   page-locked word a CUDA stream waits on: cyclic max of the word and the ticket) and marks the job done.
   One job at a time: `gw_submit` requires the previous one done (`gw_done`, `gw_wait`). Jobs alternate between two
   slots, so a worker still leaving the last job (descheduled after its last row) never holds up the next one; a
   slot is refilled only once every worker that entered it left (two jobs later: in practice long since).
   Plain C (no Python API), loaded with ctypes: called through a PyDLL (keeping the GIL) when they return at once
   (`gw_submit`, `gw_done`, `gw_wait` of a done job), through a CDLL (letting it go) when they may block. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* tvm-ffi's C ABI (tvm/ffi/c_api.h) and DLPack's DLTensor, the parts used here */
typedef struct {
    int32_t type_index;
    uint32_t zero_padding;
    union { int64_t v_int64; void *v_ptr; double v_float64; };
} ffi_any;
typedef struct { uint64_t combined_ref_count; int32_t type_index; uint32_t padding; } ffi_object_header;
typedef int (*ffi_call_t)(void *func, ffi_any *args, int32_t num_args, ffi_any *result);
typedef void (*ffi_error_moved_t)(void **result);
typedef int (*ffi_decref_t)(void *obj);
enum { FFI_NONE = 0, FFI_INT = 1, FFI_BOOL = 2, FFI_DLTENSOR_PTR = 7, FFI_STATIC_OBJECT_BEGIN = 64 };
typedef struct {
    void *data;
    struct { int32_t device_type, device_id; } device;
    int32_t ndim;
    struct { uint8_t code, bits; uint16_t lanes; } dtype;
    int64_t *shape, *strides;
    uint64_t byte_offset;
} dl_tensor;

typedef struct job {
    int64_t seq;
    int n, n_accept;
    int entered;   /* workers inside the job (under the lock) */
    int next_row;  /* atomic: the next row a worker takes */
    int finished;  /* atomic: rows done */
    int errors;    /* atomic: tvm-ffi calls that raised */
    void **matchers;
    int32_t *tokens;   /* token to accept first, or -1 */
    int32_t *rows;     /* bitmask row to fill, or -1 */
    int8_t *allow_all; /* 1: the grammar ended: the row allows every token (xgrammar fills none) */
    int8_t *accepted;  /* out: 1 accepted (or nothing to accept), 0 refused */
    int *order;        /* the accepts sorted by matcher (gw_submit) */
    int capacity;
    int64_t shape[2];
    dl_tensor bitmask;
    uint32_t *gate;  /* the gate's word, or NULL */
    uint32_t ticket;
} job;

typedef struct work {
    pthread_mutex_t mu;
    pthread_cond_t cv_job, cv_done;
    int nthreads;
    pthread_t *threads;
    int stop;
    ffi_call_t call;
    ffi_error_moved_t error_moved;
    ffi_decref_t decref;
    void *accept_fn, *fill_fn;
    int64_t seq, done;  /* jobs submitted / finished; job seq is in slots[seq & 1] */
    job slots[2];
} work;

static ffi_any object_arg(void *handle) {
    ffi_any a;
    a.type_index = ((ffi_object_header *)handle)->type_index;
    a.zero_padding = 0;
    a.v_ptr = handle;
    return a;
}

static ffi_any pod_arg(int32_t type_index, int64_t value) {
    ffi_any a;
    a.type_index = type_index;
    a.zero_padding = 0;
    a.v_int64 = value;
    return a;
}

/* call `fn` with `args`; returns its bool result, or -1 if it raised */
static int call_bool(work *w, job *jb, void *fn, ffi_any *args, int nargs) {
    ffi_any result = pod_arg(FFI_NONE, 0);
    if (w->call(fn, args, nargs, &result) != 0) {
        void *err = NULL;
        w->error_moved(&err);
        if (err) w->decref(err);
        __atomic_fetch_add(&jb->errors, 1, __ATOMIC_RELAXED);
        return -1;
    }
    if (result.type_index >= FFI_STATIC_OBJECT_BEGIN && result.v_ptr) w->decref(result.v_ptr);
    return result.type_index == FFI_BOOL || result.type_index == FFI_INT ? result.v_int64 != 0 : 1;
}

static void run_row(work *w, job *jb, int i) {
    if (jb->tokens[i] >= 0) {
        ffi_any args[3] = {object_arg(jb->matchers[i]), pod_arg(FFI_INT, jb->tokens[i]), pod_arg(FFI_BOOL, 0)};
        jb->accepted[i] = call_bool(w, jb, w->accept_fn, args, 3) == 1;
    } else {
        jb->accepted[i] = 1;
    }
    int row = jb->rows[i];
    if (row < 0) return;
    if (jb->allow_all[i]) {
        memset((int32_t *)jb->bitmask.data + (int64_t)row * jb->shape[1], 0xff, (size_t)jb->shape[1] * sizeof(int32_t));
        return;
    }
    ffi_any args[4] = {object_arg(jb->matchers[i]), pod_arg(FFI_DLTENSOR_PTR, 0), pod_arg(FFI_INT, row),
                       pod_arg(FFI_BOOL, 0)};
    args[1].v_ptr = &jb->bitmask;
    call_bool(w, jb, w->fill_fn, args, 4);
}

static void open_gate(uint32_t *word, uint32_t ticket) {
    uint32_t seen = __atomic_load_n(word, __ATOMIC_RELAXED);
    /* cyclic max: never move the word back (an older ticket changes nothing) */
    while ((uint32_t)(ticket - seen) - 1u < 0x7fffffffu &&
           !__atomic_compare_exchange_n(word, &seen, ticket, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
}

static void finish(work *w, job *jb) {
    if (jb->gate) open_gate(jb->gate, jb->ticket);
    pthread_mutex_lock(&w->mu);
    w->done = jb->seq;  /* jobs finish in order: one is submitted only once the one before is done */
    pthread_cond_broadcast(&w->cv_done);
    pthread_mutex_unlock(&w->mu);
}

static void *worker(void *arg) {
    work *w = arg;
    int64_t seen = 0;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->stop && w->seq == seen) pthread_cond_wait(&w->cv_job, &w->mu);
        if (w->stop) break;
        seen = w->seq;  /* the newest job (a worker woken late skips the ones before: they are done) */
        job *jb = &w->slots[seen & 1];
        if (!jb->n) continue;  /* an empty job, done by gw_submit */
        jb->entered++;
        pthread_mutex_unlock(&w->mu);
        for (int i; (i = __atomic_fetch_add(&jb->next_row, 1, __ATOMIC_RELAXED)) < jb->n;) {
            run_row(w, jb, i);
            /* the worker that finishes the last row: every row is written (acquire: the others' writes too) */
            if (__atomic_add_fetch(&jb->finished, 1, __ATOMIC_ACQ_REL) == jb->n) finish(w, jb);
        }
        pthread_mutex_lock(&w->mu);
        if (--jb->entered == 0) pthread_cond_broadcast(&w->cv_done);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

void gw_free(work *w);

work *gw_new(int nthreads, void *call, void *error_moved, void *decref, void *accept_fn, void *fill_fn) {
    work *w = calloc(1, sizeof(work));
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv_job, NULL);
    pthread_cond_init(&w->cv_done, NULL);
    w->call = (ffi_call_t)call;
    w->error_moved = (ffi_error_moved_t)error_moved;
    w->decref = (ffi_decref_t)decref;
    w->accept_fn = accept_fn;
    w->fill_fn = fill_fn;
    w->threads = calloc(nthreads, sizeof(pthread_t));
    if (!w->threads) { free(w); return NULL; }
    for (; w->nthreads < nthreads; w->nthreads++)
        if (pthread_create(&w->threads[w->nthreads], NULL, worker, w) != 0) break;
    if (!w->nthreads) { gw_free(w); return NULL; }
    return w;
}

static int by_matcher(const void *a, const void *b, void *base) {
    const void *x = ((void *const *)base)[*(const int *)a], *y = ((void *const *)base)[*(const int *)b];
    return x < y ? -1 : x > y;
}

/* Start a job: accept token i by matcher accept[i] (n_accept), then fill bitmask row j with the next tokens of
   matcher fill[j] (n_fill; after its accept when it has one; all allowed where allow_all[j]). The bitmask is nrows x
   width int32 in host memory, row after row (xgrammar writes row j at bitmask + j * width). The arrays are copied.
   Returns the job's sequence number, or -1 (out of memory, or the previous job is not done). Not thread-safe (one
   caller). */
int64_t gw_submit(work *w, int n_accept, void *const *accept, const int32_t *tokens, int n_fill, void *const *fill,
                  const int8_t *allow_all, void *bitmask, int64_t nrows, int64_t width, uint32_t *gate,
                  uint32_t ticket) {
    pthread_mutex_lock(&w->mu);
    if (w->done != w->seq) { pthread_mutex_unlock(&w->mu); return -1; }
    job *jb = &w->slots[(w->seq + 1) & 1];
    while (jb->entered) pthread_cond_wait(&w->cv_done, &w->mu);  /* a worker still in the job two back */
    int cap_needed = n_accept + n_fill;
    if (cap_needed > jb->capacity) {
        int cap = cap_needed > 2 * jb->capacity ? cap_needed : 2 * jb->capacity;
        void **m = realloc(jb->matchers, cap * sizeof(void *));
        if (m) jb->matchers = m;
        int32_t *t = realloc(jb->tokens, cap * sizeof(int32_t));
        if (t) jb->tokens = t;
        int32_t *r = realloc(jb->rows, cap * sizeof(int32_t));
        if (r) jb->rows = r;
        int8_t *a = realloc(jb->allow_all, cap);
        if (a) jb->allow_all = a;
        int8_t *c = realloc(jb->accepted, cap);
        if (c) jb->accepted = c;
        int *o = realloc(jb->order, cap * sizeof(int));
        if (o) jb->order = o;
        if (!m || !t || !r || !a || !c || !o) { pthread_mutex_unlock(&w->mu); return -1; }
        jb->capacity = cap;
    }
    /* rows 0..n_accept-1: the accepts; a fill whose matcher has one joins its row, the others get rows after */
    int n = n_accept;
    for (int i = 0; i < n_accept; i++) {
        jb->matchers[i] = accept[i];
        jb->tokens[i] = tokens[i];
        jb->rows[i] = -1;
        jb->allow_all[i] = 0;
        jb->order[i] = i;
    }
    qsort_r(jb->order, n_accept, sizeof(int), by_matcher, (void *)accept);
    for (int j = 0; j < n_fill; j++) {
        int lo = 0, hi = n_accept, i = -1;
        while (lo < hi) {  /* the accept of the same matcher, if any */
            int mid = (lo + hi) / 2;
            const void *m = accept[jb->order[mid]];
            if (m == fill[j]) { i = jb->order[mid]; break; }
            if ((const void *)m < (const void *)fill[j]) lo = mid + 1; else hi = mid;
        }
        if (i < 0) {
            i = n++;
            jb->matchers[i] = fill[j];
            jb->tokens[i] = -1;
        }
        jb->rows[i] = j;
        jb->allow_all[i] = allow_all[j];
    }
    jb->shape[0] = nrows;
    jb->shape[1] = width;
    memset(&jb->bitmask, 0, sizeof(jb->bitmask));
    jb->bitmask.data = bitmask;
    jb->bitmask.device.device_type = 1;  /* kDLCPU */
    jb->bitmask.ndim = 2;
    jb->bitmask.dtype.code = 0;  /* kDLInt */
    jb->bitmask.dtype.bits = 32;
    jb->bitmask.dtype.lanes = 1;
    jb->bitmask.shape = jb->shape;
    jb->gate = gate;
    jb->ticket = ticket;
    jb->n = n;
    jb->n_accept = n_accept;
    jb->next_row = 0;
    jb->finished = 0;
    jb->errors = 0;
    int64_t seq = jb->seq = ++w->seq;
    if (n == 0) {  /* nothing to do: open the gate here */
        if (gate) open_gate(gate, ticket);
        w->done = seq;
    } else {
        pthread_cond_broadcast(&w->cv_job);
    }
    pthread_mutex_unlock(&w->mu);
    return seq;
}

/* 1 if job `seq` is done (then its accepted flags and error count are readable), else 0 */
int gw_done(work *w, int64_t seq) {
    pthread_mutex_lock(&w->mu);
    int done = w->done >= seq;
    pthread_mutex_unlock(&w->mu);
    return done;
}

/* Wait for job `seq`; copy its accepted flags (one per accept, in order) into `accepted`; returns the tvm-ffi calls
   that raised. */
int gw_wait(work *w, int64_t seq, int8_t *accepted) {
    pthread_mutex_lock(&w->mu);
    while (w->done < seq) pthread_cond_wait(&w->cv_done, &w->mu);
    job *jb = &w->slots[seq & 1];
    if (accepted) memcpy(accepted, jb->accepted, jb->n_accept);
    int errors = jb->errors;
    pthread_mutex_unlock(&w->mu);
    return errors;
}

void gw_free(work *w) {
    pthread_mutex_lock(&w->mu);
    while (w->done < w->seq || w->slots[0].entered || w->slots[1].entered) pthread_cond_wait(&w->cv_done, &w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv_job);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->nthreads; i++) pthread_join(w->threads[i], NULL);
    free(w->threads);
    for (int k = 0; k < 2; k++) {
        job *jb = &w->slots[k];
        free(jb->matchers);
        free(jb->tokens);
        free(jb->rows);
        free(jb->allow_all);
        free(jb->accepted);
        free(jb->order);
    }
    free(w);
}
