/* One directory's names and lstat records in one call, for the checkpoint's walk.
 *
 * A full walk stats every entry of the root: at a million files the Python
 * loop around each lstat (a DirEntry, a stat_result, a tuple built from its
 * attributes) cost more than the system calls.  Here the entries are read and
 * stat'ed with the GIL released (the compressor and the state writer run
 * meanwhile), and the records are built straight from struct stat.  A
 * directory can be read now (list_dir), or directories by a pool of threads
 * while the caller goes on (Lister): the walk reads the next directories on
 * its stack that way while the checkpoint works on the ones it has.
 *
 * Only the common case is handled: a directory whose entries all stat cleanly.
 * Anything else (an entry gone or unreadable, a restore temporary, a symlink
 * whose target cannot be read, a read error) returns None, and the caller lists
 * that directory the careful way, in Python, as it would without this module.
 * Entries on another filesystem (a mount point below the root) are left out, as
 * the caller leaves them out.
 */
#define _GNU_SOURCE /* qsort_r */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    size_t name;   /* offset of the NUL-terminated name in the arena */
    size_t target; /* offset of a symlink's target, or (size_t)-1 */
    struct stat st;
    PyObject *str; /* the decoded name, once the GIL is held again */
} entry;

typedef struct {
    char *bytes;
    size_t len, cap;
} arena;

static int arena_reserve(arena *a, size_t more) {
    if (a->len + more <= a->cap) return 0;
    size_t cap = a->cap ? a->cap : 1 << 16;
    while (a->len + more > cap) cap *= 2;
    char *grown = realloc(a->bytes, cap);
    if (grown == NULL) return -1;
    a->bytes = grown;
    a->cap = cap;
    return 0;
}

static int by_name(const void *a, const void *b) {
    /* Python's str order (code points), which is the parent state's order; for
     * two str objects PyUnicode_Compare cannot fail. */
    return PyUnicode_Compare(((const entry *)a)->str, ((const entry *)b)->str);
}

enum outcome { LISTED, CAREFUL, NO_MEMORY };

/* Times whose nanoseconds fit in a signed 64-bit integer (until the year 2262). */
#define MAX_SECONDS 9000000000LL

static int by_bytes(const void *a, const void *b, void *names) {
    return strcmp((const char *)names + ((const entry *)a)->name,
                  (const char *)names + ((const entry *)b)->name);
}

static int is_ascii(const char *s, size_t len) {
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] & 0x80) return 0;
    return 1;
}

/* Read and stat every entry; runs without the GIL.  ``*ascii``: every name is
 * ASCII, and the entries are sorted already (byte order is string order then). */
static enum outcome read_dir(int fd, dev_t dev, const char *skip, size_t skip_len,
                             entry **out, size_t *count, arena *names, int *ascii) {
    /* A descriptor of its own for the directory, not a dup: a dup would share
     * the caller's offset (with the careful listing that may follow, and with
     * any other thread listing the same descriptor). */
    int own = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (own < 0) return CAREFUL;
    DIR *dir = fdopendir(own);
    if (dir == NULL) {
        close(own);
        return CAREFUL;
    }
    size_t cap = 64, n = 0;
    entry *es = malloc(cap * sizeof(entry));
    enum outcome got = LISTED;
    if (es == NULL) got = NO_MEMORY;
    while (got == LISTED) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (d == NULL) {
            if (errno != 0) got = CAREFUL;
            break;
        }
        const char *nm = d->d_name;
        if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0'))) continue;
        size_t len = strlen(nm);
        if (*ascii && !is_ascii(nm, len)) *ascii = 0;
        if (len >= skip_len && memcmp(nm, skip, skip_len) == 0) {
            got = CAREFUL;
            break;
        }
        if (n == cap) {
            entry *grown = realloc(es, 2 * cap * sizeof(entry));
            if (grown == NULL) {
                got = NO_MEMORY;
                break;
            }
            es = grown;
            cap *= 2;
        }
        if (arena_reserve(names, len + 1) < 0) {
            got = NO_MEMORY;
            break;
        }
        memcpy(names->bytes + names->len, nm, len + 1);
        es[n].name = names->len;
        es[n].target = (size_t)-1;
        es[n].str = NULL;
        names->len += len + 1;
        n++;
    }
    closedir(dir);
    size_t kept = 0;
    for (size_t i = 0; i < n && got == LISTED; i++) {
        entry e = es[i];
        if (fstatat(fd, names->bytes + e.name, &e.st, AT_SYMLINK_NOFOLLOW) != 0) {
            got = CAREFUL;
            break;
        }
        if (e.st.st_mtim.tv_sec > MAX_SECONDS || e.st.st_mtim.tv_sec < -MAX_SECONDS
            || e.st.st_ctim.tv_sec > MAX_SECONDS || e.st.st_ctim.tv_sec < -MAX_SECONDS) {
            got = CAREFUL; /* nanoseconds past a 64-bit integer: Python's ints hold them */
            break;
        }
        if (S_ISLNK(e.st.st_mode)) {
            if (arena_reserve(names, PATH_MAX + 1) < 0) {
                got = NO_MEMORY;
                break;
            }
            char *to = names->bytes + names->len;
            ssize_t len = readlinkat(fd, names->bytes + e.name, to, PATH_MAX);
            if (len < 0 || len >= PATH_MAX) { /* (a target that long: maybe cut short) */
                got = CAREFUL;
                break;
            }
            to[len] = '\0';
            e.target = names->len;
            names->len += (size_t)len + 1;
        } else if (e.st.st_dev != dev) {
            continue; /* another filesystem's entry: not the root's */
        }
        es[kept++] = e;
    }
    if (got != LISTED) {
        free(es);
        return got;
    }
    if (*ascii) qsort_r(es, kept, sizeof(entry), by_bytes, names->bytes);
    *out = es;
    *count = kept;
    return LISTED;
}

static PyObject *record(const entry *e, const arena *names, PyObject *empty) {
    const struct stat *s = &e->st;
    PyObject *t = PyTuple_New(9);
    if (t == NULL) return NULL;
    PyObject *target;
    if (e->target == (size_t)-1) {
        target = Py_NewRef(empty);
    } else {
        const char *to = names->bytes + e->target;
        target = PyUnicode_DecodeFSDefaultAndSize(to, (Py_ssize_t)strlen(to));
    }
    PyObject *items[9] = {
        PyLong_FromUnsignedLong(s->st_mode),
        PyLong_FromUnsignedLong(s->st_uid),
        PyLong_FromUnsignedLong(s->st_gid),
        PyLong_FromLongLong((long long)s->st_size),
        PyLong_FromLongLong((long long)s->st_mtim.tv_sec * 1000000000LL + s->st_mtim.tv_nsec),
        PyLong_FromLongLong((long long)s->st_ctim.tv_sec * 1000000000LL + s->st_ctim.tv_nsec),
        PyLong_FromUnsignedLongLong((unsigned long long)s->st_ino),
        PyLong_FromUnsignedLongLong((unsigned long long)s->st_nlink),
        target,
    };
    int failed = 0;
    for (int i = 0; i < 9; i++) {
        if (items[i] == NULL) failed = 1;
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    if (failed) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* One directory's listing, read without the GIL, turned into Python objects with it. */
typedef struct {
    int fd;
    enum outcome got;
    int ascii;
    entry *es;
    size_t n;
    arena names;
} listing;

static void read_listing(listing *l, dev_t dev, const char *skip, size_t skip_len) {
    l->es = NULL;
    l->n = 0;
    l->names = (arena){NULL, 0, 0};
    l->ascii = 1;
    l->got = read_dir(l->fd, dev, skip, skip_len, &l->es, &l->n, &l->names, &l->ascii);
    if (l->got != LISTED) { /* nothing of it is used: hold no names until it is taken */
        free(l->names.bytes);
        l->names = (arena){NULL, 0, 0};
    }
}

static void free_listing(listing *l) {
    if (l->es != NULL)
        for (size_t i = 0; i < l->n; i++) Py_XDECREF(l->es[i].str);
    free(l->es);
    free(l->names.bytes);
    l->es = NULL;
    l->names.bytes = NULL;
}

/* (names, records), None for a directory to list the careful way, NULL on error. */
static PyObject *build(listing *l, PyObject *empty) {
    if (l->got == NO_MEMORY) return PyErr_NoMemory();
    if (l->got == CAREFUL) Py_RETURN_NONE;
    entry *es = l->es;
    size_t n = l->n;
    PyObject *result = NULL, *names_list = NULL, *records = NULL;
    for (size_t i = 0; i < n; i++) {
        const char *nm = l->names.bytes + es[i].name;
        Py_ssize_t len = (Py_ssize_t)strlen(nm);
        es[i].str = l->ascii ? PyUnicode_DecodeASCII(nm, len, NULL)
                             : PyUnicode_DecodeFSDefaultAndSize(nm, len);
        if (es[i].str == NULL) goto done;
    }
    if (!l->ascii) qsort(es, n, sizeof(entry), by_name);
    names_list = PyList_New((Py_ssize_t)n);
    records = PyList_New((Py_ssize_t)n);
    if (names_list == NULL || records == NULL) goto done;
    for (size_t i = 0; i < n; i++) {
        PyObject *rec = record(&es[i], &l->names, empty);
        if (rec == NULL) goto done;
        PyList_SET_ITEM(names_list, (Py_ssize_t)i, es[i].str);
        es[i].str = NULL;
        PyList_SET_ITEM(records, (Py_ssize_t)i, rec);
    }
    result = PyTuple_Pack(2, names_list, records);
done:
    Py_XDECREF(names_list);
    Py_XDECREF(records);
    return result;
}

#define MAX_THREADS 16

/* A descriptor from the caller's sequence; -1 with an exception set. */
static int fd_of(PyObject *item) {
    long fd = PyLong_AsLong(item);
    if (fd == -1 && PyErr_Occurred()) return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "not a descriptor: %ld", fd);
        return -1;
    }
    return (int)fd;
}

/* A thread with every signal blocked: they go to the interpreter's threads, and
 * none interrupts a system call of the lister's (which would decline it). */
static int spawn(pthread_t *thread, void *(*run)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int failed = pthread_create(thread, NULL, run, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return failed;
}

static PyObject *empty_str; /* a record's target where there is none */

PyDoc_STRVAR(list_dir_doc,
"list_dir(fd, dev, skip) -> (names, records) | None\n\n"
"The directory open at fd: its entries, sorted by name, and their lstat\n"
"records (mode, uid, gid, size, mtime_ns, ctime_ns, ino, nlink, symlink target\n"
"or \"\"), leaving out entries whose st_dev is not dev; None when it needs the\n"
"careful listing (an entry gone or unreadable, a name starting with skip, a\n"
"read error).  Read without the GIL; fd stays the caller's.");

static PyObject *list_dir(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *fd_arg;
    unsigned long long dev;
    const char *skip;
    Py_ssize_t skip_len;
    if (!PyArg_ParseTuple(args, "OKy#:list_dir", &fd_arg, &dev, &skip, &skip_len)) return NULL;
    if (!PyLong_Check(fd_arg)) {
        PyErr_SetString(PyExc_TypeError, "list_dir: fd must be a descriptor");
        return NULL;
    }
    int fd = fd_of(fd_arg);
    if (fd < 0) return NULL;
    listing l = {.fd = fd};
    Py_BEGIN_ALLOW_THREADS
    read_listing(&l, (dev_t)dev, skip, (size_t)skip_len);
    Py_END_ALLOW_THREADS
    PyObject *got = build(&l, empty_str);
    free_listing(&l);
    return got;
}

/* Directories read ahead of the walk by a pool of threads that lives as long as
 * the walk: the walk hands over the next directories on its stack
 * (Lister.later) and goes on with the ones it has; reaching them, it takes each
 * (Later.take), reading it itself if no thread has begun it, so it never waits
 * idle while there is reading to do.  The threads read a batch from its end,
 * the walk takes from its start.  Started anew for every batch, as they were,
 * threads cost about a tenth of a million-file walk; the pool starts them once
 * and they wait for the next batch.
 *
 * Memory stays bounded: the threads stop taking directories while the listings
 * read and not yet taken hold ``budget`` entries or more (the walk's own takes
 * are never held up).  One mutex guards the shared fields.  Its holders never
 * take the GIL, so a thread holding the GIL may lock it; one that waits on a
 * condition or reads a directory releases the GIL first. */

enum { UNCLAIMED, READING, READ, TAKEN };

typedef struct later Later;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work; /* a directory to read (or budget freed), or stop */
    pthread_cond_t read; /* a directory read */
    Later *head;         /* batches holding directories no thread has begun, newest first */
    size_t held;         /* entries read and not yet taken */
    size_t budget;
    int stop;
    int ready; /* the mutex and conditions exist */
    int threads, started;
    pthread_t helpers[MAX_THREADS];
    dev_t dev;
    char skip[64];
    size_t skip_len;
} Lister;

struct later {
    PyObject_HEAD
    Lister *owner; /* a strong reference: the pool outlives its batches */
    listing *ls;
    unsigned char *state; /* per directory, guarded by owner->mu */
    size_t count;
    size_t end;       /* no unclaimed directory at or after it */
    size_t unclaimed; /* in owner's list while non-zero */
    Later *prev, *next;
};

/* The rest of this section's helpers run with owner->mu held. */
static void unlink_later(Later *l) {
    if (l->prev != NULL)
        l->prev->next = l->next;
    else
        l->owner->head = l->next;
    if (l->next != NULL) l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

static void claim(Later *l, size_t i) {
    l->state[i] = READING;
    if (--l->unclaimed == 0) unlink_later(l);
    while (l->end > 0 && l->state[l->end - 1] != UNCLAIMED) l->end--;
}

static void release(Lister *o, size_t entries) {
    size_t before = o->held;
    o->held -= entries;
    if (before >= o->budget && o->held < o->budget) pthread_cond_broadcast(&o->work);
}

/* Without the mutex: a claimed directory read, and its descriptor closed. */
static void read_claimed(Lister *o, listing *l) {
    read_listing(l, o->dev, o->skip, o->skip_len);
    close(l->fd);
    l->fd = -1;
}

static void *serve(void *arg) {
    Lister *o = arg;
    pthread_mutex_lock(&o->mu);
    for (;;) {
        while (!o->stop && (o->head == NULL || o->held >= o->budget))
            pthread_cond_wait(&o->work, &o->mu);
        if (o->stop) break;
        /* From the end of the newest batch: the walk takes from its start. */
        Later *l = o->head;
        size_t i = l->end - 1;
        claim(l, i);
        pthread_mutex_unlock(&o->mu);
        read_claimed(o, &l->ls[i]); /* l stays: its dealloc waits for READING */
        pthread_mutex_lock(&o->mu);
        l->state[i] = READ;
        o->held += l->ls[i].n;
        pthread_cond_broadcast(&o->read);
    }
    pthread_mutex_unlock(&o->mu);
    return NULL;
}

static PyObject *later_take(PyObject *self, PyObject *arg) {
    Later *l = (Later *)self;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || (size_t)i >= l->count) {
        PyErr_SetString(PyExc_IndexError, "Later.take: no such directory");
        return NULL;
    }
    Lister *o = l->owner;
    int again = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&o->mu);
    if (l->state[i] == UNCLAIMED) { /* no thread has begun it: read it here, not wait */
        claim(l, i);
        pthread_mutex_unlock(&o->mu);
        read_claimed(o, &l->ls[i]);
        pthread_mutex_lock(&o->mu);
        l->state[i] = TAKEN;
        pthread_cond_broadcast(&o->read); /* (for another taker of the same one) */
    } else {
        while (l->state[i] == READING) pthread_cond_wait(&o->read, &o->mu);
        if (l->state[i] == TAKEN) {
            again = 1;
        } else {
            release(o, l->ls[i].n);
            l->state[i] = TAKEN;
        }
    }
    pthread_mutex_unlock(&o->mu);
    Py_END_ALLOW_THREADS
    if (again) {
        PyErr_SetString(PyExc_RuntimeError, "Later.take: already taken");
        return NULL;
    }
    PyObject *got = build(&l->ls[i], empty_str);
    free_listing(&l->ls[i]);
    return got;
}

static void later_dealloc(PyObject *self) {
    Later *l = (Later *)self;
    Lister *o = l->owner;
    if (o != NULL) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&o->mu);
        for (size_t i = 0; i < l->count; i++) {
            if (l->state[i] == UNCLAIMED) { /* never to be read */
                claim(l, i);
                close(l->ls[i].fd);
                l->state[i] = TAKEN;
            }
        }
        for (size_t i = 0; i < l->count; i++) {
            while (l->state[i] == READING) pthread_cond_wait(&o->read, &o->mu);
            if (l->state[i] == READ) release(o, l->ls[i].n);
        }
        pthread_mutex_unlock(&o->mu);
        Py_END_ALLOW_THREADS
    }
    if (l->ls != NULL)
        for (size_t i = 0; i < l->count; i++) free_listing(&l->ls[i]);
    free(l->ls);
    free(l->state);
    Py_XDECREF(o);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef later_methods[] = {
    {"take", later_take, METH_O,
     "take(i) -> (names, records) | None: the i-th directory, as list_dir reads\n"
     "it, read now if no thread has begun it (once each)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.checkpoint._listdir.Later",
    .tp_basicsize = sizeof(Later),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = later_dealloc,
    .tp_methods = later_methods,
    .tp_doc = "Directories handed to a Lister: each taken once, when the walk reaches it.\n"
              "Dropped, it closes the descriptors of those no thread has begun.",
};

static PyObject *lister_later(PyObject *self, PyObject *fds) {
    Lister *o = (Lister *)self;
    if (!PyList_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "Lister.later: fds must be a list of descriptors");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(fds, "fds must be a sequence of descriptors");
    if (seq == NULL) return NULL;
    size_t n = (size_t)PySequence_Fast_GET_SIZE(seq);
    Later *l = PyObject_New(Later, &LaterType);
    if (l == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    l->owner = NULL; /* the descriptors are still the caller's */
    l->count = n;
    l->end = n;
    l->unclaimed = n;
    l->prev = l->next = NULL;
    l->ls = calloc(n ? n : 1, sizeof(listing));
    l->state = calloc(n ? n : 1, 1); /* UNCLAIMED */
    if (l->ls == NULL || l->state == NULL) {
        Py_DECREF(seq);
        l->count = 0;
        Py_DECREF(l);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++) {
        int fd = fd_of(PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)i));
        for (size_t j = 0; j < i && fd >= 0; j++) {
            if (l->ls[j].fd == fd) { /* it would be closed twice */
                PyErr_Format(PyExc_ValueError, "descriptor %d given twice", fd);
                fd = -1;
            }
        }
        if (fd < 0) {
            Py_DECREF(seq);
            l->count = 0;
            Py_DECREF(l);
            return NULL;
        }
        l->ls[i].fd = fd;
    }
    Py_DECREF(seq);
    /* From here on the descriptors are the Later's, and no longer in the list:
     * a caller cleaning up after an exception closes only what is left in it. */
    if (PyList_SetSlice(fds, 0, (Py_ssize_t)n, NULL) < 0) {
        l->count = 0;
        Py_DECREF(l);
        return NULL;
    }
    Py_INCREF(o);
    l->owner = o;
    if (n == 0) return (PyObject *)l;
    while (o->started < o->threads && spawn(&o->helpers[o->started], serve, o) == 0)
        o->started++;
    pthread_mutex_lock(&o->mu);
    l->next = o->head;
    if (o->head != NULL) o->head->prev = l;
    o->head = l;
    pthread_cond_broadcast(&o->work);
    pthread_mutex_unlock(&o->mu);
    return (PyObject *)l;
}

static PyObject *lister_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"dev", "skip", "threads", "budget", NULL};
    unsigned long long dev;
    const char *skip;
    Py_ssize_t skip_len, budget = 1 << 16;
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ky#i|n:Lister", keywords, &dev, &skip,
                                     &skip_len, &threads, &budget))
        return NULL;
    if ((size_t)skip_len >= sizeof(((Lister *)NULL)->skip)) {
        PyErr_SetString(PyExc_ValueError, "Lister: skip is too long");
        return NULL;
    }
    if (budget < 0) {
        PyErr_SetString(PyExc_ValueError, "Lister: budget must not be negative");
        return NULL;
    }
    Lister *o = (Lister *)type->tp_alloc(type, 0);
    if (o == NULL) return NULL;
    if (pthread_mutex_init(&o->mu, NULL) != 0) {
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    if (pthread_cond_init(&o->work, NULL) != 0) {
        pthread_mutex_destroy(&o->mu);
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    if (pthread_cond_init(&o->read, NULL) != 0) {
        pthread_cond_destroy(&o->work);
        pthread_mutex_destroy(&o->mu);
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    o->ready = 1;
    o->threads = threads < 0 ? 0 : threads > MAX_THREADS ? MAX_THREADS : threads;
    o->budget = (size_t)budget;
    o->dev = (dev_t)dev;
    memcpy(o->skip, skip, (size_t)skip_len);
    o->skip_len = (size_t)skip_len;
    return (PyObject *)o;
}

static void lister_dealloc(PyObject *self) {
    Lister *o = (Lister *)self;
    if (o->ready) { /* no batch is left: each held a reference */
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&o->mu);
        o->stop = 1;
        pthread_cond_broadcast(&o->work);
        pthread_mutex_unlock(&o->mu);
        for (int t = 0; t < o->started; t++) pthread_join(o->helpers[t], NULL);
        Py_END_ALLOW_THREADS
        pthread_cond_destroy(&o->read);
        pthread_cond_destroy(&o->work);
        pthread_mutex_destroy(&o->mu);
    }
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef lister_methods[] = {
    {"later", lister_later, METH_O,
     "later(fds) -> Later: start reading the directories open at the list fds,\n"
     "the newest batch first, and return at once.  The Later owns the descriptors\n"
     "it took out of fds (it closes them): the caller must not close them, nor use\n"
     "them again; those left in fds (all of them when it raises) are the caller's."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ListerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.checkpoint._listdir.Lister",
    .tp_basicsize = sizeof(Lister),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = lister_new,
    .tp_dealloc = lister_dealloc,
    .tp_methods = lister_methods,
    .tp_doc = "Lister(dev, skip, threads, budget=65536): up to threads threads (started\n"
              "on first use) reading directories as list_dir reads them, while the\n"
              "listings read and not yet taken hold fewer than budget entries.",
};

static PyMethodDef methods[] = {
    {"list_dir", list_dir, METH_VARARGS, list_dir_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_listdir",
    .m_doc = "Directories' names and lstat records, read without the GIL (see scan.walk).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__listdir(void) {
    if (PyType_Ready(&LaterType) < 0 || PyType_Ready(&ListerType) < 0) return NULL;
    empty_str = PyUnicode_FromStringAndSize("", 0);
    if (empty_str == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Lister", (PyObject *)&ListerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
