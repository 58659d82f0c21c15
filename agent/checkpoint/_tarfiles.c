/* A directory's small files read and framed as tar entries in one call, for
 * the layer writer.
 *
 * A checkpoint of a software install writes tens of thousands of small files.
 * In Python each one cost an open, a listxattr, a read, an fstat, a close and
 * a header built from bytes objects: more than the system calls themselves.
 * Here a run of them is read straight into the layer's buffer with the GIL
 * released (the compressor's thread runs meanwhile), and each header is built
 * as ``tarformat.encode_header`` builds it in its common case.
 *
 * Only that common case is framed: a regular file with one link, no larger than
 * the caller's bound, no extended attributes, whose path is ASCII and fits the
 * ustar name field, with small ids and a time after 1970.  At the first file
 * that is anything else (or that cannot be opened, read or fstat'ed, or is no
 * longer a regular file), the call stops and leaves it to the caller, whose
 * Python path writes it (or reports it) as it writes every file without this
 * module.  A file that changed since the walk recorded it is still written
 * consistently, exactly the size its header declares, and reported as dirty.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLOCK 512
/* The most a header takes: a PAX header block, its record's block, the ustar block. */
#define MAX_HEADER (3 * BLOCK)
#define MAX_OCTAL_7 07777777LL
#define MAX_OCTAL_11 077777777777LL
#define OPEN_FLAGS (O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)

/* The scan's record fields (scan.Stat). */
enum { MODE, UID, GID, SIZE, MTIME, CTIME, INO, NLINK, RECORD_FIELDS = 9 };

enum outcome { CLEAN, DIRTY, DECLINED };

typedef struct {
    const char *name; /* the entry's name in its directory (UTF-8 bytes of the str) */
    Py_ssize_t name_len;
    long long mode, uid, gid, size, mtime_ns, ctime_ns, ino;
    enum outcome got; /* once read */
} file;

/* A ustar header block as tarformat._ustar packs it. */
static void ustar(char *h, const char *prefix, size_t prefix_len, const char *name,
                  size_t name_len, long long mode, long long uid, long long gid,
                  long long size, long long mtime, char type) {
    memset(h, 0, BLOCK);
    memcpy(h, prefix, prefix_len);
    memcpy(h + prefix_len, name, name_len);
    snprintf(h + 100, 9, "%07llo", mode & 07777);
    snprintf(h + 108, 9, "%07llo", uid);
    snprintf(h + 116, 9, "%07llo", gid);
    snprintf(h + 124, 13, "%011llo", size);
    snprintf(h + 136, 13, "%011llo", mtime);
    memset(h + 148, ' ', 8);
    h[156] = type;
    memcpy(h + 257, "ustar\0" "00", 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++) sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum); /* six digits, NUL, and the space left there */
}

/* The header block(s) of ``f`` at ``h``; their length. */
static size_t header(char *h, const char *prefix, size_t prefix_len, const file *f) {
    long long secs = f->mtime_ns / 1000000000LL, frac = f->mtime_ns % 1000000000LL;
    if (frac == 0) {
        ustar(h, prefix, prefix_len, f->name, (size_t)f->name_len, f->mode, f->uid, f->gid,
              f->size, secs, '0');
        return BLOCK;
    }
    /* "NN mtime=<secs>.<9 digits>\n": the record says only the nanosecond time. */
    char value[32];
    int vlen = snprintf(value, sizeof value, "%lld.%09lld", secs, frac);
    int rlen = vlen + 10;
    ustar(h, "", 0, "PaxHeader", 9, 0644, 0, 0, rlen, 0, 'x');
    memset(h + BLOCK, 0, BLOCK);
    snprintf(h + BLOCK, BLOCK, "%d mtime=%s\n", rlen, value);
    ustar(h + 2 * BLOCK, prefix, prefix_len, f->name, (size_t)f->name_len, f->mode, f->uid,
          f->gid, f->size, secs, '0');
    return 3 * BLOCK;
}

static size_t padded(long long size) {
    return ((size_t)size + BLOCK - 1) / BLOCK * BLOCK;
}

static int is_ascii(const char *s, size_t len) {
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] & 0x80) return 0;
    return 1;
}

/* Whether the caller's record of ``f`` is one this module frames. */
static int framed_here(const file *f, size_t prefix_len, long long max_size) {
    return S_ISREG(f->mode) && f->size <= max_size && f->size >= 0 &&
           prefix_len + (size_t)f->name_len <= 100 && is_ascii(f->name, (size_t)f->name_len) &&
           f->uid >= 0 && f->uid <= MAX_OCTAL_7 && f->gid >= 0 && f->gid <= MAX_OCTAL_7 &&
           f->mtime_ns >= 0 && f->mtime_ns / 1000000000LL <= MAX_OCTAL_11;
}

/* Read one file into ``out`` (``f->size`` bytes, zeros where it came up short);
 * runs without the GIL. */
static enum outcome read_one(int dirfd, const file *f, char *out) {
    int fd = openat(dirfd, f->name, OPEN_FLAGS);
    if (fd < 0) return DECLINED;
    enum outcome got = CLEAN;
    ssize_t xattrs = flistxattr(fd, NULL, 0);
    if (xattrs > 0 || (xattrs < 0 && errno != ENOTSUP)) got = DECLINED;
    size_t want = (size_t)f->size, have = 0;
    while (got == CLEAN && have < want) {
        ssize_t n = read(fd, out + have, want - have);
        if (n < 0) {
            if (errno == EINTR) continue;
            got = DECLINED;
        } else if (n == 0) {
            break;
        } else {
            have += (size_t)n;
        }
    }
    struct stat after;
    if (got == CLEAN && (fstat(fd, &after) != 0 || !S_ISREG(after.st_mode))) got = DECLINED;
    close(fd);
    if (got == DECLINED) return DECLINED;
    memset(out + have, 0, want - have);
    long long mtime = (long long)after.st_mtim.tv_sec * 1000000000LL + after.st_mtim.tv_nsec;
    long long ctime = (long long)after.st_ctim.tv_sec * 1000000000LL + after.st_ctim.tv_nsec;
    if (have < want || mtime != f->mtime_ns || ctime != f->ctime_ns ||
        (long long)after.st_size != f->size || (long long)after.st_ino != f->ino)
        return DIRTY;
    return CLEAN;
}

/* Only ints: converting anything else could run Python code (``__index__``)
 * that changes the lists being read. */
static int field(PyObject *rec, int i, long long *out) {
    PyObject *v = PyTuple_GET_ITEM(rec, i);
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "frame_files: a record's fields are int");
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The files of ``which[start:]`` that can be framed here, up to the first that
 * cannot, and no more once ``limit`` bytes are planned; -1 with an exception set. */
static Py_ssize_t plan(PyObject *names, PyObject *records, PyObject *which, Py_ssize_t start,
                       size_t prefix_len, long long max_size, size_t limit, file *fs,
                       Py_ssize_t cap, size_t *total) {
    Py_ssize_t n = 0;
    *total = 0;
    for (Py_ssize_t k = start; k < PyList_GET_SIZE(which) && n < cap && *total < limit; k++) {
        PyObject *at = PyList_GET_ITEM(which, k);
        if (!PyLong_Check(at)) {
            PyErr_SetString(PyExc_TypeError, "frame_files: which holds int indices");
            return -1;
        }
        Py_ssize_t i = PyLong_AsSsize_t(at);
        if (i == -1 && PyErr_Occurred()) return -1;
        if (i < 0 || i >= PyList_GET_SIZE(names) || i >= PyList_GET_SIZE(records)) {
            PyErr_SetString(PyExc_IndexError, "frame_files: an index outside the listing");
            return -1;
        }
        PyObject *name = PyList_GET_ITEM(names, i), *rec = PyList_GET_ITEM(records, i);
        if (!PyUnicode_Check(name) || !PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != RECORD_FIELDS) {
            PyErr_SetString(PyExc_TypeError, "frame_files: names are str, records scan.Stat");
            return -1;
        }
        file *f = &fs[n];
        long long nlink;
        if (field(rec, MODE, &f->mode) || field(rec, UID, &f->uid) || field(rec, GID, &f->gid) ||
            field(rec, SIZE, &f->size) || field(rec, MTIME, &f->mtime_ns) ||
            field(rec, CTIME, &f->ctime_ns) || field(rec, INO, &f->ino) ||
            field(rec, NLINK, &nlink))
            return -1;
        /* (a name with a lone surrogate has no UTF-8: not ASCII, left to the caller) */
        f->name = PyUnicode_AsUTF8AndSize(name, &f->name_len);
        if (f->name == NULL) {
            PyErr_Clear();
            break;
        }
        if (nlink != 1 || !framed_here(f, prefix_len, max_size) ||
            memchr(f->name, '/', (size_t)f->name_len) != NULL ||
            memchr(f->name, '\0', (size_t)f->name_len) != NULL || f->name_len == 0)
            break;
        *total += MAX_HEADER + padded(f->size);
        n++;
    }
    return n;
}

#define MAX_RUN 4096

PyDoc_STRVAR(frame_files_doc,
"frame_files(buf, dirfd, prefix, names, records, which, start, limit, max_size)\n"
"    -> (count, content_bytes, dirty)\n\n"
"Append to the bytearray buf the tar entries of the files names[i] (opened at\n"
"the directory descriptor dirfd, never through a symlink), for i in\n"
"which[start:], in order, each under prefix + name, with the header\n"
"tarformat.encode_header makes of its scan record records[i] and exactly\n"
"that record's size of content.  Stops at the first file it does not frame\n"
"(see the module's doc) and once buf holds limit bytes or more.  count: the\n"
"files framed; content_bytes: their sizes' sum; dirty: the positions in which\n"
"of those that changed since their record was taken.");

static PyObject *frame_files(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *buf, *names, *records, *which;
    int dirfd;
    const char *prefix;
    Py_ssize_t prefix_len, start, limit_arg;
    long long max_size;
    if (!PyArg_ParseTuple(args, "Yiy#O!O!O!nnL:frame_files", &buf, &dirfd, &prefix, &prefix_len,
                          &PyList_Type, &names, &PyList_Type, &records, &PyList_Type, &which,
                          &start, &limit_arg, &max_size))
        return NULL;
    if (start < 0 || limit_arg < 0 || max_size < 0 || max_size > (1LL << 30)) {
        PyErr_SetString(PyExc_ValueError, "frame_files: start, limit and max_size out of range");
        return NULL;
    }
    if (!is_ascii(prefix, (size_t)prefix_len) || memchr(prefix, '\0', (size_t)prefix_len) != NULL)
        return Py_BuildValue("nLN", (Py_ssize_t)0, 0LL, PyList_New(0));
    Py_ssize_t held = PyByteArray_GET_SIZE(buf);
    size_t limit = (size_t)limit_arg > (size_t)held ? (size_t)limit_arg - (size_t)held : 1;
    file *fs = PyMem_Malloc(MAX_RUN * sizeof(file));
    if (fs == NULL) return PyErr_NoMemory();
    /* The names' UTF-8 is read without the GIL: the listing, like the buffer, is
     * the writer thread's alone (the call's arguments hold both meanwhile). */
    size_t total;
    Py_ssize_t n = plan(names, records, which, start, (size_t)prefix_len, max_size, limit, fs,
                        MAX_RUN, &total);
    PyObject *dirty = n >= 0 ? PyList_New(0) : NULL;
    if (dirty == NULL || PyByteArray_Resize(buf, held + (Py_ssize_t)total) < 0) {
        PyMem_Free(fs);
        Py_XDECREF(dirty);
        return NULL;
    }
    /* The buffer is the writer's alone, and nothing else resizes it meanwhile. */
    char *base = PyByteArray_AS_STRING(buf) + held;
    Py_ssize_t done = 0;
    size_t used = 0;
    long long content = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; done < n; done++) {
        file *f = &fs[done];
        char *h = base + used;
        size_t hlen = header(h, prefix, (size_t)prefix_len, f);
        f->got = read_one(dirfd, f, h + hlen);
        if (f->got == DECLINED) break;
        size_t data = padded(f->size);
        memset(h + hlen + f->size, 0, data - (size_t)f->size);
        used += hlen + data;
        content += f->size;
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (PyByteArray_Resize(buf, held + (Py_ssize_t)used) == 0) {
        for (Py_ssize_t k = 0; k < done; k++) {
            if (fs[k].got != DIRTY) continue;
            PyObject *at = PyLong_FromSsize_t(start + k);
            if (at == NULL || PyList_Append(dirty, at) < 0) {
                Py_XDECREF(at);
                goto out;
            }
            Py_DECREF(at);
        }
        result = Py_BuildValue("nLO", done, content, dirty);
    }
out:
    PyMem_Free(fs);
    Py_DECREF(dirty);
    return result;
}

static PyMethodDef methods[] = {
    {"frame_files", frame_files, METH_VARARGS, frame_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_tarfiles",
    .m_doc = "A directory's small files read and framed as tar entries (see layer_writer).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__tarfiles(void) { return PyModule_Create(&module); }
