/* A native thread that writes batches of (socket, bytes) items without Python's GIL (asyncllm/server/send_thread.py).

   The event loop hands over one batch per engine step (`sq_submit`, which copies it); the thread sends each item
   with one non-blocking send() and reports, per batch, the items it did not send in full (`sq_reap`). A socket
   whose item was not sent in full is "spilled": the thread attempts none of its later items (they come back
   unsent, in order) until the loop calls `sq_forget`, so bytes never overtake each other. Batches complete in
   submission order; each completion adds 1 to an eventfd the loop watches.
   Plain C (no Python API): loaded with ctypes.PyDLL, so calls keep the GIL and return at once. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct batch {
    int64_t seq;
    int n;
    int *fds;
    int64_t *ends;  /* item i is data[ends[i-1]:ends[i]] (ends[-1] = 0) */
    int64_t *sent;  /* bytes sent of item i, or -errno */
    char *data;
    struct batch *next;
} batch;

typedef struct sendq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    batch *todo, *todo_tail, *done, *done_tail;
    int64_t next_seq;
    int stop;
    int efd;
    int *spilled;  /* fds with an item not sent in full, until forgotten */
    int n_spilled, cap_spilled;
} sendq;

static int is_spilled(sendq *q, int fd) {
    for (int i = 0; i < q->n_spilled; i++)
        if (q->spilled[i] == fd) return 1;
    return 0;
}

static void add_spilled(sendq *q, int fd) {
    if (q->n_spilled == q->cap_spilled) {
        int cap = q->cap_spilled ? 2 * q->cap_spilled : 16;
        int *grown = realloc(q->spilled, cap * sizeof(int));
        if (!grown) abort();
        q->spilled = grown;
        q->cap_spilled = cap;
    }
    q->spilled[q->n_spilled++] = fd;
}

static void send_batch(sendq *q, batch *b) {
    int64_t start = 0;
    for (int i = 0; i < b->n; i++) {
        int64_t len = b->ends[i] - start, off = 0;
        int fd = b->fds[i];
        pthread_mutex_lock(&q->mu);
        int skip = is_spilled(q, fd);
        pthread_mutex_unlock(&q->mu);
        while (!skip && off < len) {
            ssize_t r = send(fd, b->data + start + off, (size_t)(len - off), MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r >= 0) { off += r; continue; }
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) off = -errno;
            break;
        }
        b->sent[i] = off;
        if (!skip && off != len) {
            pthread_mutex_lock(&q->mu);
            add_spilled(q, fd);
            pthread_mutex_unlock(&q->mu);
        }
        start = b->ends[i];
    }
}

static void *run(void *arg) {
    sendq *q = arg;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (!q->todo && !q->stop) pthread_cond_wait(&q->cv, &q->mu);
        batch *b = q->todo;
        if (!b) { pthread_mutex_unlock(&q->mu); return NULL; }  /* stopped, nothing left */
        q->todo = b->next;
        if (!q->todo) q->todo_tail = NULL;
        pthread_mutex_unlock(&q->mu);
        send_batch(q, b);
        b->next = NULL;
        pthread_mutex_lock(&q->mu);
        if (q->done_tail) q->done_tail->next = b; else q->done = b;
        q->done_tail = b;
        pthread_mutex_unlock(&q->mu);
        uint64_t one = 1;
        ssize_t w = write(q->efd, &one, sizeof one);
        (void)w;
    }
}

sendq *sq_new(void) {
    sendq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) { free(q); return NULL; }
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    if (pthread_create(&q->thread, NULL, run, q) != 0) { close(q->efd); free(q); return NULL; }
    return q;
}

int sq_eventfd(sendq *q) { return q->efd; }

/* Queues n items (copied); returns the batch's sequence number (1, 2, ...), or -1 when out of memory. */
int64_t sq_submit(sendq *q, int n, const int *fds, const int64_t *ends, const char *data) {
    batch *b = calloc(1, sizeof *b);
    int64_t size = n ? ends[n - 1] : 0;
    if (!b) return -1;
    b->fds = malloc(n * sizeof(int) + 1);
    b->ends = malloc(n * sizeof(int64_t) + 1);
    b->sent = malloc(n * sizeof(int64_t) + 1);
    b->data = malloc(size + 1);
    if (!b->fds || !b->ends || !b->sent || !b->data) {
        free(b->fds); free(b->ends); free(b->sent); free(b->data); free(b);
        return -1;
    }
    b->n = n;
    memcpy(b->fds, fds, n * sizeof(int));
    memcpy(b->ends, ends, n * sizeof(int64_t));
    memcpy(b->data, data, size);
    pthread_mutex_lock(&q->mu);
    b->seq = ++q->next_seq;
    if (q->todo_tail) q->todo_tail->next = b; else q->todo = b;
    q->todo_tail = b;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return b->seq;
}

/* Takes the oldest completed batch: its sequence number, or 0 when none. The items not sent in full are written
   to short[] (index, bytes sent or -errno), at most cap of them; *n_short is their count (a batch has at most
   as many as items: pass cap >= the largest batch). */
int64_t sq_reap(sendq *q, int64_t *shorts, int cap, int *n_short) {
    pthread_mutex_lock(&q->mu);
    batch *b = q->done;
    if (b) {
        q->done = b->next;
        if (!q->done) q->done_tail = NULL;
    }
    pthread_mutex_unlock(&q->mu);
    *n_short = 0;
    if (!b) return 0;
    int64_t start = 0;
    for (int i = 0; i < b->n; i++) {
        if (b->sent[i] != b->ends[i] - start && *n_short < cap) {
            shorts[2 * *n_short] = i;
            shorts[2 * *n_short + 1] = b->sent[i];
            (*n_short)++;
        }
        start = b->ends[i];
    }
    int64_t seq = b->seq;
    free(b->fds); free(b->ends); free(b->sent); free(b->data); free(b);
    return seq;
}

/* The loop has written fd's spilled bytes itself and sends nothing more through this thread until it closes fd. */
void sq_forget(sendq *q, int fd) {
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < q->n_spilled; i++)
        if (q->spilled[i] == fd) { q->spilled[i] = q->spilled[--q->n_spilled]; break; }
    pthread_mutex_unlock(&q->mu);
}

/* Stops the thread once every queued batch is sent (their reports stay for sq_reap). */
void sq_stop(sendq *q) {
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thread, NULL);
}

/* Frees a stopped queue (and any report not reaped). */
void sq_free(sendq *q) {
    while (q->done) {
        batch *b = q->done;
        q->done = b->next;
        free(b->fds); free(b->ends); free(b->sent); free(b->data); free(b);
    }
    close(q->efd);
    free(q->spilled);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    free(q);
}
