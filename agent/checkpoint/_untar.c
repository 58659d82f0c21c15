/* A run of plain files of one directory written from a layer's buffer in one
 * call, for the restore.
 *
 * A restore of a software install creates tens of thousands of small files.
 * In Python each one cost a header parsed into an object, a merge decision, an
 * open, a write, an fchmod, a utime and a close, each a call through the
 * interpreter: more than the system calls themselves.  Here a run of them is
 * written with the GIL released (the decompressing thread runs meanwhile).
 *
 * Nothing is decided here that the restore's Python pass would decide
 * otherwise.  The caller has applied the run's first file itself, in a
 * directory it opened through RootDirs, and judged that every other new file
 * there is written as this one was (restore._write_run says when).  Only the
 * common case is written: an entry of our writer's shape, a ustar header
 * (after at most its one-record PAX header of a nanosecond mtime) of a regular
 * file named ``prefix`` plus one plain ASCII name, whose content lies in the
 * buffer, that fits the free-space budget and that is new in the directory
 * (O_EXCL).  At the first entry that is anything else, or whose header does
 * not parse here exactly, or whose file cannot be created, written or
 * finished, the call stops before it, removing what it created of it, and
 * leaves it to the Python pass, which parses, judges, writes and reports it as
 * it does every entry without this module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
#define ENTRY_OVERHEAD 4096 /* diskspace.ENTRY_OVERHEAD */
#define MTIME_MIN_RECORD 21 /* tarformat._MTIME_RECORD_LENGTHS */
#define MTIME_MAX_RECORD 31
#define CREATE_FLAGS (O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW)
#define MAX_RUN 4096

typedef struct {
    Py_ssize_t name_at; /* where the entry's full name starts in the buffer */
    int name_len;
} written;

/* An octal number field: digits, then NUL or space to the end (a field of
 * only NULs and spaces is 0).  Anything else: -1, left to the Python parser. */
static long long octal(const unsigned char *f, int width) {
    long long v = 0;
    int i = 0;
    while (i < width && f[i] >= '0' && f[i] <= '7') {
        v = v * 8 + (f[i] - '0');
        i++;
    }
    for (; i < width; i++)
        if (f[i] != 0 && f[i] != ' ')
            return -1;
    return v;
}

static int checksum_ok(const unsigned char *h) {
    long long stored = octal(h + 148, 8);
    long sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        if (i < 148 || i >= 156)
            sum += h[i];
    return stored == sum;
}

/* Digits only, at least one: their value; else -1. */
static long long digits(const unsigned char *s, int n) {
    long long v = 0;
    if (n <= 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* The mtime of our writer's PAX record ``"NN mtime=<secs>.<9 digits>\n"`` of
 * ``n`` bytes, as tarformat.parse_mtime_record reads it; 0 if it is not one. */
static int mtime_record(const unsigned char *r, int n, long long *secs, long *nsec) {
    int secs_len = n - 20;
    if (r[0] - '0' != n / 10 || r[1] - '0' != n % 10 || memcmp(r + 2, " mtime=", 7) != 0 ||
        r[n - 1] != '\n' || r[9 + secs_len] != '.')
        return 0;
    long long s = digits(r + 9, secs_len), f = digits(r + 10 + secs_len, 9);
    if (s < 0 || f < 0)
        return 0;
    *secs = s;
    *nsec = (long)f;
    return 1;
}

/* One plain name of a directory entry: printable ASCII without '/', not "."
 * or "..", no "..", and not a whiteout. */
static int plain_name(const unsigned char *s, int n) {
    if (n <= 0 || (s[0] == '.' && (n == 1 || (n == 2 && s[1] == '.'))))
        return 0;
    if (n >= 4 && memcmp(s, ".wh.", 4) == 0)
        return 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '/')
            return 0;
        if (s[i] == '.' && i + 1 < n && s[i + 1] == '.')
            return 0;
    }
    return 1;
}

static int write_all(int fd, const unsigned char *p, long long n) {
    while (n > 0) {
        ssize_t k = write(fd, p, n > (1 << 30) ? (1 << 30) : (size_t)n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= k;
    }
    return 0;
}

typedef struct {
    const unsigned char *buf;
    Py_ssize_t len;
    int dirfd;
    const unsigned char *prefix;
    Py_ssize_t prefix_len;
    const unsigned char *pax_blocks; /* our mtime PAX header blocks, by record length */
    long long budget_bytes, budget_inodes;
    long long uid, gid;
    int umask, strict, max_files;
} run;

/* The file at ``p`` written and finished: the offset just after its entry,
 * or 0 when it is left to the Python pass (nothing of it remains then). */
static Py_ssize_t one(run *r, Py_ssize_t p, written *out, long long *content) {
    const unsigned char *h = r->buf + p;
    Py_ssize_t at = p;
    long long secs = -1;
    long nsec = 0;
    if (r->len - at < BLOCK)
        return 0;
    if (h[156] == 'x') { /* our one-record PAX header: compared whole, as the reader does */
        if (r->len - at < 3 * BLOCK)
            return 0;
        long long size = octal(h + 124, 12);
        if (size < MTIME_MIN_RECORD || size > MTIME_MAX_RECORD ||
            memcmp(h, r->pax_blocks + (size - MTIME_MIN_RECORD) * BLOCK, BLOCK) != 0 ||
            !mtime_record(h + BLOCK, (int)size, &secs, &nsec))
            return 0;
        at += 2 * BLOCK;
        h = r->buf + at;
    }
    if (h[156] != '0' || h[157] != 0 || h[345] != 0 || memcmp(h + 257, "ustar\0", 6) != 0 ||
        !checksum_ok(h))
        return 0;
    long long mode = octal(h + 100, 8), uid = octal(h + 108, 8), gid = octal(h + 116, 8);
    long long size = octal(h + 124, 12), mtime = octal(h + 136, 12);
    if (mode < 0 || uid < 0 || gid < 0 || size < 0 || mtime < 0)
        return 0;
    const unsigned char *nul = memchr(h, 0, 100);
    int name_len = nul ? (int)(nul - h) : 100;
    int base_len = name_len - (int)r->prefix_len;
    if (base_len <= 0 || memcmp(h, r->prefix, r->prefix_len) != 0 ||
        !plain_name(h + r->prefix_len, base_len))
        return 0;
    Py_ssize_t data = at + BLOCK;
    Py_ssize_t end = data + (Py_ssize_t)((size + BLOCK - 1) / BLOCK * BLOCK);
    if (size > r->len || end > r->len)
        return 0;
    if (r->budget_bytes < size + ENTRY_OVERHEAD || r->budget_inodes < 1)
        return 0;
    if (secs < 0)
        secs = mtime;
    mode &= 07777;
    int create_mode = mode <= 0777 ? (int)mode : 0600;
    char base[101];
    memcpy(base, h + r->prefix_len, base_len);
    base[base_len] = 0;

    int fd = openat(r->dirfd, base, CREATE_FLAGS, create_mode);
    if (fd < 0)
        return 0;
    int ok = write_all(fd, r->buf + data, size) == 0;
    /* As metadata.finish_file: the owner, the mode (after, as chown clears
     * special bits), then the times. */
    if (ok && (uid != r->uid || gid != r->gid) && fchown(fd, (uid_t)uid, (gid_t)gid) != 0)
        ok = !r->strict && (errno == EPERM || errno == EACCES);
    if (ok && mode != (create_mode & ~r->umask))
        ok = fchmod(fd, (mode_t)mode) == 0;
    if (ok) {
        struct timespec times[2] = {{(time_t)secs, nsec}, {(time_t)secs, nsec}};
        ok = futimens(fd, times) == 0;
    }
    if (close(fd) != 0)
        ok = 0;
    if (!ok) {
        unlinkat(r->dirfd, base, 0);
        return 0;
    }
    r->budget_bytes -= size + ENTRY_OVERHEAD;
    r->budget_inodes -= 1;
    *content += size;
    out->name_at = at;
    out->name_len = name_len;
    return end;
}

static PyObject *write_files(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf, prefix, pax;
    Py_ssize_t pos;
    run r;
    if (!PyArg_ParseTuple(args, "y*niy*y*LLLLiii:write_files", &buf, &pos, &r.dirfd, &prefix,
                          &pax, &r.budget_bytes, &r.budget_inodes, &r.uid, &r.gid, &r.umask,
                          &r.strict, &r.max_files))
        return NULL;
    PyObject *result = NULL;
    written *done = NULL;
    if (pax.len != (MTIME_MAX_RECORD - MTIME_MIN_RECORD + 1) * BLOCK || pos < 0 ||
        pos > buf.len || r.max_files < 0) {
        PyErr_SetString(PyExc_ValueError, "write_files: bad arguments");
        goto out;
    }
    if (r.max_files > MAX_RUN)
        r.max_files = MAX_RUN;
    done = PyMem_Malloc(sizeof(written) * (r.max_files + 1));
    if (done == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    r.buf = buf.buf;
    r.len = buf.len;
    r.prefix = prefix.buf;
    r.prefix_len = prefix.len;
    r.pax_blocks = pax.buf;
    int count = 0;
    long long content = 0;
    Py_BEGIN_ALLOW_THREADS
    while (count < r.max_files) {
        Py_ssize_t next = one(&r, pos, &done[count], &content);
        if (next == 0)
            break;
        pos = next;
        count++;
    }
    Py_END_ALLOW_THREADS
    PyObject *names = PyList_New(count);
    if (names == NULL)
        goto out;
    for (int i = 0; i < count; i++) {
        PyObject *s = PyUnicode_DecodeASCII((const char *)r.buf + done[i].name_at,
                                            done[i].name_len, NULL);
        if (s == NULL) {
            Py_DECREF(names);
            goto out;
        }
        PyList_SET_ITEM(names, i, s);
    }
    result = Py_BuildValue("(nNL)", pos, names, content);
out:
    PyMem_Free(done);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&pax);
    return result;
}

static PyMethodDef methods[] = {
    {"write_files", write_files, METH_VARARGS,
     "write_files(buf, pos, dirfd, prefix, pax_blocks, budget_bytes, budget_inodes, uid, gid,\n"
     "            umask, strict, max_files) -> (pos, names, content_bytes)\n\n"
     "Write the run of plain new files of one directory that starts at ``pos``."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_untar", "A restore's runs of plain files, written in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__untar(void) { return PyModule_Create(&module); }
