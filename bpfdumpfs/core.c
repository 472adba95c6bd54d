/* The data plane: the threads that read /dev/fuse, and the opens, reads and releases
 * of dumper files they serve without Python (see core.py for the design).
 *
 * Everything here is either a quick decision or a kernel call. Whatever needs a
 * judgement -- a first open, a refusal to log, a seek, an error, a request for
 * anything but a published dumper file -- is forwarded to Python whole,
 * one SOCK_SEQPACKET message per request, as /dev/fuse gave it; Python then takes
 * over the file (core_adopt) and serves it from there on.
 *
 * Locks: pool_lock (threads), entries.lock (published dumpers), files.lock (files),
 * user_lock (counts), a budget's lock, and a file's own (its flags), each held only for
 * bookkeeping; the only one taken inside another is a budget's (inside a file's, at
 * adoption). A file's `busy` flag, not a lock, keeps one thread at a time reading it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/io_uring.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CORE_FH_BIT (1ULL << 62)   /* fhs of files this core serves; Python's are small */
#define MAX_BUCKETS 32
#define TABLE 4096                 /* hash buckets of published dumpers and of files */
#define MAX_WAITING 4              /* a thread that finds this many waiting to lead ends */
#define KEEP_TOUCHED (64 << 10)    /* of a ring entry's payload, kept resident after a large reply */
#define LARGE_REPLY (64 << 10)     /* a reply a worker writes while the kernel reads on */

/* -- shared with Python (declared in core.py's cdef) ------------------------------- */
struct core_pace { int refs; uint64_t reads; double avg_ns; };
struct core_stats {
    uint64_t opens; int64_t handles; uint64_t bytes; uint64_t latency_ns;
    uint64_t latency[MAX_BUCKETS + 1];
};
struct core_config {
    uint64_t spin_ns;        /* the leader asks again for this long before it sleeps */
    uint32_t kernel_buf;     /* room given to every kernel read of a seq_file */
    uint32_t max_eagain;
    uint32_t back;           /* bytes before the position kept for a seek back */
    uint32_t max_read;       /* the largest FUSE READ */
    uint32_t bufsize;        /* room for the largest request */
    uint32_t open_flags;     /* FOPEN_* of every open */
    uint32_t blksize;        /* a dumper file's st_blksize (ops._file_attr) */
    uint32_t attr_valid;     /* seconds the kernel may keep a published file's attributes */
    uint64_t read_private_caps;  /* what uid 0 needs to read a dumper not world-readable */
    uint64_t fh_base;        /* set in every fh made here: the server's generation */
};
struct core_limits {
    uint32_t max_files, max_user_files;  /* 0: no limit */
    uint64_t open_budget_ns;             /* 0: none */
    struct core_budget *read_ahead;
    uint32_t streaming_after, read_ahead_reads, max_ahead;  /* reader.py's */
};
struct core_adopted {
    int fd, link_fd, err, ended;
    uint32_t uid, pid;
    uint64_t user_ns, pos, opened_ns;
    uint32_t back_len, surplus_len;
    char *surplus;           /* malloc'd: the caller frees it (core_free) */
    struct core_pace *pace;
    char label[512];
};

/* -- private ------------------------------------------------------------------------- */
/* The head of a reference-counted object kept in a table by key: published dumpers by
 * inode, open files by fh. References are taken and put atomically: a table's lock
 * guards its chains, not the counts. */
struct node {
    struct node *next;
    uint64_t key;
    int refs;
};

struct table {
    pthread_mutex_t lock;
    struct node *chains[TABLE];
};

struct entry {                       /* a published dumper: what an open needs */
    struct node node;                  /* by inode */
    int link_fd, ns_kind, cred;  /* ns_kind: 0, or 1 pid / 2 net (reader's view) */
    char home_ns[64];                  /* the daemon's namespace of ns_kind */
    char *pin_path, *label;
    uint64_t pin_ino;                  /* the pin published: another at pin_path is not */
    struct core_stats *stats;
    struct core_pace *pace;
};

struct file {                        /* an open dumper file served here */
    struct node node;                 /* by fh */
    int fd, released, python, ended, err;
    struct entry *e;
    uint32_t uid, pid;
    uint64_t user_ns, pos, opened_ns;
    pthread_mutex_t lock;             /* guards busy, python and parked */
    pthread_cond_t idle;              /* busy cleared */
    int busy;                         /* a thread reads it (or reads ahead): one at a time */
    struct job *parked;               /* a READ that came while busy, answered after */
    /* read from the kernel beyond pos, not yet asked for: a kernel read's overshoot,
     * or a producer's read-ahead (counted in the budget as `counted`); only the
     * thread that has the file busy touches it */
    struct chunk *head, *tail;        /* head_off of head's bytes are served */
    uint32_t head_off, surplus_len;
    uint64_t counted;
    uint32_t full_reads;              /* READs answered whole in a row */
    uint32_t largest;                 /* the largest READ so far */
    char *back; uint32_t back_len;
};

/* Read-ahead is kept in chunks that a reply lends to writev as they are, so a byte
 * is copied once between the kernel's seq_file and the reader's pages. A chunk holds
 * two kernel buffers: a kernel read goes into the tail's room while a whole
 * kernel buffer fits, so every chunk but the last holds nearly one or more, and a
 * READ's reply spans at most max_read / kernel_buf + 3 of them. Chunks are
 * reference-counted (the file's queue, and each reply being written that lends from
 * it): nobody writes to a byte once it is in the queue. Chunks put are kept for the
 * streams reading on -- fresh memory costs a page fault per 4 KiB, ~5% of a large
 * dump here -- and core_trim, twice a second, gives back the memory of those beyond
 * KEEP_SPARE, or of all once nothing streams: 32 streams' worth does not stay
 * resident while one streams on. */
struct chunk {
    struct chunk *next;
    int refs;
    uint32_t len;
    char data[];                      /* chunk_room() bytes */
};
#define MAX_LEND 48                   /* iovecs of one reply: 1 MiB / 32 KiB + 3, and room */
#define KEEP_SPARE 64                 /* 4 MiB of 64 KiB chunks: a stream's and more */

/* A count per user (core_user_key), in a small array: few users read at once. A
 * user whose count falls to 0 is dropped. Its owner's lock guards it. */
struct tally {
    struct { uint64_t key, n; } *slots;
    uint32_t len, cap;
};

/* The read-ahead budget (reader.py's Budget): bytes all producers together may hold
 * ahead of their readers, one user's at most `share` of them. */
struct core_budget {
    pthread_mutex_t lock;
    uint64_t limit, held;   /* limit 0: none */
    double share;
    struct tally users;
};

static struct core_config cfg;
static uint64_t quick_ns;      /* a dumper is quick while its reads average less... */
static uint32_t learn_reads;   /* ...after this many */
static struct core_limits lim;
static int max_threads, debug;  /* debug: forward every request, for Python to log */
static double buckets[MAX_BUCKETS];
static int nbuckets;
static int dev_fd = -1, fwd_fd = -1;
static char init_userns[64];

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t lead = PTHREAD_MUTEX_INITIALIZER;
static int threads, waiting, dead;
static int draining;  /* the connection passes to another server: take no more requests */
static pthread_cond_t job_cond;

static struct table entries = {.lock = PTHREAD_MUTEX_INITIALIZER};
static struct table files = {.lock = PTHREAD_MUTEX_INITIALIZER};
static uint64_t next_fh = 1;  /* under files.lock */

static pthread_mutex_t user_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tally user_files;  /* open files per user */
static uint32_t total_files;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* -- paces, stats, counts --------------------------------------------------------------- */
struct core_pace *core_pace_new(void)
{
    struct core_pace *p = calloc(1, sizeof(*p));
    if (p)
        p->refs = 1;
    return p;
}

void core_pace_put(struct core_pace *p)
{
    if (p && __atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(p);
}

int core_pace_quick(const struct core_pace *p)
{
    return p->reads >= learn_reads && p->avg_ns < (double)quick_ns;
}

void core_pace_record(struct core_pace *p, uint64_t ns)
{
    /* one slow read weighs enough to make the dumper slow at once */
    p->reads++;
    p->avg_ns = ns > quick_ns ? (double)ns : 0.8 * p->avg_ns + 0.2 * (double)ns;
}

struct core_stats *core_stats_new(void)
{
    return calloc(1, sizeof(struct core_stats));
}

void core_count_open(struct core_stats *s)
{
    __atomic_add_fetch(&s->opens, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->handles, 1, __ATOMIC_RELAXED);
}

void core_count_close(struct core_stats *s)
{
    __atomic_sub_fetch(&s->handles, 1, __ATOMIC_RELAXED);
}

void core_count_read(struct core_stats *s, uint64_t nbytes, uint64_t ns)
{
    int i = 0;
    double seconds = (double)ns / 1e9;
    while (i < nbuckets && seconds > buckets[i])
        i++;
    __atomic_add_fetch(&s->bytes, nbytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->latency[i], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->latency_ns, ns, __ATOMIC_RELAXED);
}

/* The key a user's counts are kept under: the uid in its pid namespace (privilege.User),
 * for Python (reader.user_key) and C alike. */
uint64_t core_user_key(uint32_t uid, uint64_t ns)
{
    return ns << 32 | uid;
}

static uint64_t tally_get(const struct tally *t, uint64_t key)
{
    for (uint32_t i = 0; i < t->len; i++)
        if (t->slots[i].key == key)
            return t->slots[i].n;
    return 0;
}

/* KEY's count moved by N; ENOMEM if a new key found no room (the count unchanged). */
static int tally_add(struct tally *t, uint64_t key, int64_t n)
{
    uint32_t i = 0;
    while (i < t->len && t->slots[i].key != key)
        i++;
    if (i == t->len) {
        if (t->len == t->cap) {
            uint32_t cap = t->cap ? 2 * t->cap : 16;
            void *grown = realloc(t->slots, cap * sizeof(*t->slots));
            if (!grown)
                return ENOMEM;
            t->slots = grown;
            t->cap = cap;
        }
        t->slots[t->len].key = key;
        t->slots[t->len++].n = 0;
    }
    t->slots[i].n += n;
    if (!t->slots[i].n)
        t->slots[i] = t->slots[--t->len];
    return 0;
}

int core_admit(uint32_t uid, uint64_t ns)
{
    uint64_t key = core_user_key(uid, ns);
    int err = 0;
    pthread_mutex_lock(&user_lock);
    if (lim.max_files && total_files >= lim.max_files)
        err = ENFILE;
    else if (lim.max_user_files && tally_get(&user_files, key) >= lim.max_user_files)
        err = EMFILE;
    else if (!(err = tally_add(&user_files, key, 1)))
        total_files++;
    pthread_mutex_unlock(&user_lock);
    return err;
}

void core_unadmit(uint32_t uid, uint64_t ns)
{
    uint64_t key = core_user_key(uid, ns);
    pthread_mutex_lock(&user_lock);
    if (tally_get(&user_files, key)) {
        tally_add(&user_files, key, -1);
        total_files--;
    }
    pthread_mutex_unlock(&user_lock);
}

uint32_t core_files(uint32_t uid, uint64_t ns, uint32_t *mine)
{
    pthread_mutex_lock(&user_lock);
    *mine = tally_get(&user_files, core_user_key(uid, ns));
    uint32_t total = total_files;
    pthread_mutex_unlock(&user_lock);
    return total;
}

struct core_budget *core_budget_new(uint64_t limit, double share)
{
    struct core_budget *b = calloc(1, sizeof(*b));
    if (b) {
        pthread_mutex_init(&b->lock, NULL);
        b->limit = limit;
        b->share = share;
    }
    return b;
}

void core_budget_add(struct core_budget *b, uint64_t key, int64_t n)
{
    pthread_mutex_lock(&b->lock);
    b->held += n;
    tally_add(&b->users, key, n);  /* on ENOMEM uncounted per user: the total still bounds */
    pthread_mutex_unlock(&b->lock);
}

int core_budget_spent(struct core_budget *b, uint64_t key)
{
    if (!b->limit)
        return 0;
    pthread_mutex_lock(&b->lock);
    int spent = b->held >= b->limit || tally_get(&b->users, key) >= b->limit * b->share;
    pthread_mutex_unlock(&b->lock);
    return spent;
}

/* Count N more bytes for KEY if that keeps within the budget: 1, or 0 if spent. Checked
 * and counted under one lock, so that producers asking at once cannot pass it together. */
static int budget_take(struct core_budget *b, uint64_t key, uint64_t n)
{
    pthread_mutex_lock(&b->lock);
    int room = !b->limit || (b->held + n <= b->limit
                             && tally_get(&b->users, key) + n <= b->limit * b->share);
    if (room) {
        b->held += n;
        tally_add(&b->users, key, n);
    }
    pthread_mutex_unlock(&b->lock);
    return room;
}

uint64_t core_budget_held(struct core_budget *b, uint64_t key, int all)
{
    pthread_mutex_lock(&b->lock);
    uint64_t held = all ? b->held : tally_get(&b->users, key);
    pthread_mutex_unlock(&b->lock);
    return held;
}

uint32_t core_budget_users(struct core_budget *b)
{
    pthread_mutex_lock(&b->lock);
    uint32_t n = b->users.len;
    pthread_mutex_unlock(&b->lock);
    return n;
}

/* -- who asks ---------------------------------------------------------------------------- */
static int ns_link(uint32_t pid, const char *kind, char *out, size_t size)
{
    char path[64];
    if (pid == 0)
        return -1;
    snprintf(path, sizeof(path), "/proc/%u/ns/%s", pid, kind);
    ssize_t n = readlink(path, out, size - 1);
    if (n < 0)
        return -1;
    out[n] = 0;
    return 0;
}

uint64_t core_pid_ns(uint32_t pid)
{
    char name[64];
    if (ns_link(pid, "pid", name, sizeof(name)))
        return 0;
    char *open = strchr(name, '[');
    return open ? strtoull(open + 1, NULL, 10) : 0;
}

uint64_t core_effective_caps(uint32_t pid)
{
    char userns[64], path[64], line[256];
    uint64_t caps = 0;
    if (ns_link(pid, "user", userns, sizeof(userns)) || strcmp(userns, init_userns))
        return 0;  /* gone, unseen, or in another user namespace: no capability of ours */
    snprintf(path, sizeof(path), "/proc/%u/status", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (!strncmp(line, "CapEff:", 7)) {
            caps = strtoull(line + 7, NULL, 16);
            break;
        }
    fclose(f);
    return caps;
}

struct cap_header { uint32_t version; int pid; };
struct cap_data { uint32_t effective, permitted, inheritable; };

/* A seq_file of LINK_FD made with no effective capabilities beyond MASK (capset is per
 * thread); -1 with errno. */
static int iter_create(int link_fd, int limit, uint64_t mask)
{
    union bpf_attr attr = {.iter_create = {.link_fd = link_fd}};
    struct cap_header h = {0x20080522, 0};
    struct cap_data d[2], want[2];
    int dropped = 0;
    if (limit) {
        if (syscall(SYS_capget, &h, d))
            return -1;
        memcpy(want, d, sizeof(d));
        want[0].effective &= (uint32_t)mask;
        want[1].effective &= (uint32_t)(mask >> 32);
        dropped = memcmp(want, d, sizeof(d)) != 0;
        if (dropped && syscall(SYS_capset, &h, want))
            return -1;
    }
    int fd = syscall(SYS_bpf, BPF_ITER_CREATE, &attr, sizeof(attr.iter_create));
    int saved = errno;
    if (dropped)
        syscall(SYS_capset, &h, d);
    errno = saved;
    return fd;
}

/* -- tables ------------------------------------------------------------------------------ */
static void node_hold(struct node *n)
{
    __atomic_add_fetch(&n->refs, 1, __ATOMIC_ACQ_REL);
}

/* Put a reference: whether it was the last (the caller frees the object). */
static int node_put(struct node *n)
{
    return __atomic_sub_fetch(&n->refs, 1, __ATOMIC_ACQ_REL) == 0;
}

/* KEY's node with a reference of the caller's, or NULL. */
static struct node *table_get(struct table *t, uint64_t key)
{
    pthread_mutex_lock(&t->lock);
    struct node *n = t->chains[key % TABLE];
    while (n && n->key != key)
        n = n->next;
    if (n)
        node_hold(n);
    pthread_mutex_unlock(&t->lock);
    return n;
}

/* With t->lock held: KEY's node out of T, the table's reference passed to the caller. */
static struct node *table_unlink_locked(struct table *t, uint64_t key)
{
    struct node **p = &t->chains[key % TABLE], *n;
    while ((n = *p) && n->key != key)
        p = &n->next;
    if (n)
        *p = n->next;
    return n;
}

static struct node *table_unlink(struct table *t, uint64_t key)
{
    pthread_mutex_lock(&t->lock);
    struct node *n = table_unlink_locked(t, key);
    pthread_mutex_unlock(&t->lock);
    return n;
}

/* With t->lock held: N in T, holding the reference it was made with. */
static void table_add_locked(struct table *t, struct node *n)
{
    n->next = t->chains[n->key % TABLE];
    t->chains[n->key % TABLE] = n;
}

/* -- published dumpers ---------------------------------------------------------------- */
static void entry_put(struct entry *e)
{
    if (!node_put(&e->node))
        return;
    close(e->link_fd);
    core_pace_put(e->pace);
    free(e->pin_path);
    free(e->label);
    free(e);
}

static struct entry *entry_get(uint64_t nodeid)
{
    return (struct entry *)table_get(&entries, nodeid);
}

void core_unpublish(uint64_t nodeid)
{
    struct entry *e = (struct entry *)table_unlink(&entries, nodeid);
    if (e)
        entry_put(e);
}

int core_publish(uint64_t nodeid, int link_fd, const char *label, const char *pin_path,
                 uint64_t pin_ino, int ns_kind, const char *home_ns, int cred, struct core_stats *stats,
                 struct core_pace *pace)
{
    struct entry *e = calloc(1, sizeof(*e));
    if (!e)
        return ENOMEM;
    e->link_fd = fcntl(link_fd, F_DUPFD_CLOEXEC, 3);  /* Python may close its own */
    e->label = strdup(label);
    e->pin_path = strdup(pin_path);
    if (e->link_fd < 0 || !e->label || !e->pin_path) {
        int err = e->link_fd < 0 ? errno : ENOMEM;
        if (e->link_fd >= 0)
            close(e->link_fd);
        free(e->label);
        free(e->pin_path);
        free(e);
        return err;
    }
    e->node = (struct node){.key = nodeid, .refs = 1};
    e->pin_ino = pin_ino;
    e->ns_kind = ns_kind;
    snprintf(e->home_ns, sizeof(e->home_ns), "%s", home_ns);
    e->cred = cred;
    e->stats = stats;
    __atomic_add_fetch(&pace->refs, 1, __ATOMIC_ACQ_REL);
    e->pace = pace;
    pthread_mutex_lock(&entries.lock);
    struct entry *old = (struct entry *)table_unlink_locked(&entries, nodeid);
    table_add_locked(&entries, &e->node);
    pthread_mutex_unlock(&entries.lock);
    if (old)
        entry_put(old);
    return 0;
}

/* -- read-ahead chunks ---------------------------------------------------------------- */
/* Chunks are carved from one region, reserved at the first (no memory until
 * touched): mapping and unmapping each would take the mm's lock for writing, and
 * every thread faulting meanwhile waits for it, all woken at once after -- a herd of
 * 20 threads every few ms under 32 streams, with a CPU idle while they queue on the
 * other. The free ones are a stack of indices, the most recently put on top;
 * those below `cold` have been given back (MADV_DONTNEED) and fault in on reuse. */
#define REGION_CHUNKS 4096           /* 256 MiB of address space; beyond, chunks are mapped */
static struct {
    pthread_mutex_t lock;
    char *region;
    uint32_t carved;                 /* chunks of the region handed out so far */
    uint32_t *free, n, cold;         /* free[0..n): free chunks; free[0..cold): given back */
} spare = {.lock = PTHREAD_MUTEX_INITIALIZER};

static size_t chunk_size(void)
{
    return 2 * (size_t)cfg.kernel_buf;
}

static uint32_t chunk_room(void)
{
    return chunk_size() - sizeof(struct chunk);
}

static int in_region(const struct chunk *c)
{
    return spare.region && (const char *)c >= spare.region
        && (const char *)c < spare.region + REGION_CHUNKS * chunk_size();
}

static struct chunk *chunk_new(void)
{
    struct chunk *c = NULL;
    pthread_mutex_lock(&spare.lock);
    if (!spare.region) {
        void *r = mmap(NULL, REGION_CHUNKS * chunk_size(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        spare.free = malloc(REGION_CHUNKS * sizeof(*spare.free));
        if (r != MAP_FAILED && spare.free)
            spare.region = r;
        else if (r != MAP_FAILED)
            munmap(r, REGION_CHUNKS * chunk_size());
    }
    if (spare.n) {
        c = (struct chunk *)(spare.region + spare.free[--spare.n] * chunk_size());
        if (spare.cold > spare.n)
            spare.cold = spare.n;
    } else if (spare.region && spare.carved < REGION_CHUNKS) {
        c = (struct chunk *)(spare.region + spare.carved++ * chunk_size());
    }
    pthread_mutex_unlock(&spare.lock);
    if (!c) {
        c = mmap(NULL, chunk_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c == MAP_FAILED)
            return NULL;
    }
    c->next = NULL;
    c->refs = 1;
    c->len = 0;
    return c;
}

static void chunk_put(struct chunk *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL))
        return;
    if (!in_region(c)) {
        munmap(c, chunk_size());
        return;
    }
    pthread_mutex_lock(&spare.lock);
    spare.free[spare.n++] = ((char *)c - spare.region) / chunk_size();
    pthread_mutex_unlock(&spare.lock);
}

/* Give back the memory of the free chunks but the KEEP_SPARE last put, or ALL
 * (resources.py). */
void core_trim(int all)
{
    uint32_t keep = all ? 0 : KEEP_SPARE;
    pthread_mutex_lock(&spare.lock);
    /* under the lock, so that none of them is reused meanwhile: ~1 us a chunk, and
     * rarely more than a burst's few hundred */
    for (; spare.cold + keep < spare.n; spare.cold++)
        madvise(spare.region + spare.free[spare.cold] * chunk_size(), chunk_size(),
                MADV_DONTNEED);
    pthread_mutex_unlock(&spare.lock);
}

/* One kernel read of F into its surplus: into the tail chunk while a whole kernel
 * buffer fits there (the cgroup iterator fails a read after one that left output
 * behind), else into a new one. Returns read(2)'s result. */
static ssize_t surplus_read(struct file *f)
{
    struct chunk *c = f->tail;
    int fresh = !c || chunk_room() - c->len < cfg.kernel_buf;
    if (fresh && !(c = chunk_new())) {
        errno = ENOMEM;
        return -1;
    }
    ssize_t n = read(f->fd, c->data + c->len, cfg.kernel_buf);
    if (n > 0) {
        c->len += n;
        f->surplus_len += n;
    }
    if (fresh && n > 0) {
        if (f->tail)
            f->tail->next = c;
        else
            f->head = c;
        f->tail = c;
    } else if (fresh) {
        chunk_put(c);
    }
    return n;
}

/* Consume N bytes of F's surplus from the head: into OUT if given, else lent as up
 * to MAX_LEND iovecs into IOV (always enough for max_read: see struct chunk), each
 * with a reference of its chunk in HELD, put by the caller once the reply is
 * written. Returns how many iovecs. */
static int surplus_take(struct file *f, uint32_t n, char *out, struct iovec *iov,
                        struct chunk **held)
{
    int i = 0;
    for (uint32_t done = 0; done < n && (out || i < MAX_LEND); i++) {
        struct chunk *c = f->head;
        uint32_t k = c->len - f->head_off < n - done ? c->len - f->head_off : n - done;
        if (out) {
            memcpy(out + done, c->data + f->head_off, k);
        } else {
            __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
            iov[i] = (struct iovec){c->data + f->head_off, k};
            held[i] = c;
        }
        done += k;
        f->head_off += k;
        f->surplus_len -= k;
        if (f->head_off == c->len) {
            f->head = c->next;
            if (!f->head)
                f->tail = NULL;
            f->head_off = 0;
            chunk_put(c);
        }
    }
    return i;
}

static void surplus_free(struct file *f)
{
    while (f->head) {
        struct chunk *next = f->head->next;
        chunk_put(f->head);
        f->head = next;
    }
    f->tail = NULL;
    f->head_off = f->surplus_len = 0;
}

/* -- files ------------------------------------------------------------------------------- */
static void budget_give(struct file *f, uint64_t n);

static void file_put(struct file *f)
{
    if (!node_put(&f->node))
        return;
    if (f->fd >= 0)
        close(f->fd);
    budget_give(f, f->counted);
    entry_put(f->e);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->idle);
    surplus_free(f);
    free(f->back);
    free(f);
}

static uint64_t user_key(const struct file *f)
{
    return core_user_key(f->uid, f->user_ns);
}

/* Give back up to N of the bytes F's producer counted in the budget (reader.py: the
 * bytes a READ takes are given back as far as a producer read them). */
static void budget_give(struct file *f, uint64_t n)
{
    if (n > f->counted)
        n = f->counted;
    if (n && lim.read_ahead) {
        core_budget_add(lim.read_ahead, user_key(f), -(int64_t)n);
        f->counted -= n;
    }
}

static struct file *file_get(uint64_t fh)
{
    return (struct file *)table_get(&files, fh);
}

/* FH out of the table, its reference passed to the caller; NULL if not here. */
static struct file *file_unlink(uint64_t fh)
{
    return (struct file *)table_unlink(&files, fh);
}

static void file_release(struct file *f)
{
    pthread_mutex_lock(&f->lock);
    f->released = 1;  /* a producer stops */
    pthread_mutex_unlock(&f->lock);
    core_count_close(f->e->stats);
    core_unadmit(f->uid, f->user_ns);
    file_put(f);
}

void core_free(void *p)
{
    free(p);
}

int core_adopt(uint64_t fh, struct core_adopted *a, char *back)
{
    struct file *f = file_unlink(fh);
    if (!f)
        return 0;
    pthread_mutex_lock(&f->lock);
    while (f->busy)  /* a read under way ends first */
        pthread_cond_wait(&f->idle, &f->lock);
    a->fd = f->fd;
    f->fd = -1;
    a->link_fd = fcntl(f->e->link_fd, F_DUPFD_CLOEXEC, 3);
    a->err = f->err;
    a->ended = f->ended;
    a->uid = f->uid;
    a->pid = f->pid;
    a->user_ns = f->user_ns;
    a->pos = f->pos;
    a->opened_ns = f->opened_ns;
    a->back_len = f->back_len;
    memcpy(back, f->back, f->back_len);
    /* a kernel read's overshoot, or up to a producer's read-ahead */
    a->surplus = f->surplus_len ? malloc(f->surplus_len) : NULL;
    a->surplus_len = a->surplus ? f->surplus_len : 0;
    if (a->surplus)
        surplus_take(f, a->surplus_len, a->surplus, NULL, NULL);
    else if (f->surplus_len) {  /* the bytes are lost: the file ends in an error */
        a->err = ENOMEM;
        a->ended = 1;
    }
    budget_give(f, f->counted);  /* Python's reader counts only what it reads ahead */
    __atomic_add_fetch(&f->e->pace->refs, 1, __ATOMIC_ACQ_REL);
    a->pace = f->e->pace;
    snprintf(a->label, sizeof(a->label), "%s", f->e->label);
    pthread_mutex_unlock(&f->lock);
    file_put(f);  /* its count in the limits and the stats now Python's */
    return 1;
}

/* Take no more requests (keeper.py: the next server gets them, FUSE_NOTIFY_RESEND) */
void core_drain(void)
{
    __atomic_store_n(&draining, 1, __ATOMIC_RELEASE);
}

void core_release_all(void)
{
    for (int i = 0; i < TABLE; i++) {
        pthread_mutex_lock(&files.lock);
        struct node *n = files.chains[i];
        files.chains[i] = NULL;
        pthread_mutex_unlock(&files.lock);
        while (n) {
            struct node *next = n->next;
            file_release((struct file *)n);
            n = next;
        }
    }
}

/* -- requests ----------------------------------------------------------------------------- */
struct queue;

struct req {                     /* a request being served */
    const struct fuse_in_header *in;
    const void *body;            /* its per-opcode struct */
    const char *raw;             /* /dev/fuse: the request as read */
    size_t raw_len;
    struct queue *q;             /* io_uring: the queue and entry holding it; NULL: /dev/fuse */
    int ent;
    char *out;                   /* io_uring: room for a READ's data, max_read + a kernel
                                  * buffer; NULL: /dev/fuse, whose replies lend chunks */
};

static void ring_reply(struct queue *q, int ent, uint64_t unique, int err, const struct iovec *iov,
                       int n);
static int ring_forward(const struct req *r);
static void hand_off(void);

static void reply_iov(const struct req *r, int err, const struct iovec *iov, int n)
{
    if (r->q) {
        ring_reply(r->q, r->ent, r->in->unique, err, iov, err ? 0 : n);
        return;
    }
    struct fuse_out_header out = {sizeof(out), -err, r->in->unique};
    struct iovec v[1 + MAX_LEND] = {{&out, sizeof(out)}};
    for (int i = 0; i < n && !err; i++) {
        v[1 + i] = iov[i];
        out.len += iov[i].iov_len;
    }
    /* ENOENT: the request was interrupted (its reader died); ENODEV: unmounted */
    if (writev(dev_fd, v, err ? 1 : 1 + n) < 0 && errno != ENOENT && errno != ENODEV)
        fprintf(stderr, "bpfdumpfs core: writing to /dev/fuse: %s\n", strerror(errno));
}

static void reply(const struct req *r, int err, const void *data, size_t size)
{
    struct iovec iov = {(void *)data, size};
    reply_iov(r, err, &iov, 1);
}

static void forward(const struct req *r)
{
    int failed = r->q ? ring_forward(r) : send(fwd_fd, r->raw, r->raw_len, MSG_NOSIGNAL) < 0;
    if (failed)
        reply(r, EIO, NULL, 0);
}

/* Serve an OPEN here, or return 0 to forward it. */
static int open_file(const struct req *r)
{
    const struct fuse_in_header *in = r->in;
    const struct fuse_open_in *o = r->body;
    if ((o->flags & O_ACCMODE) != O_RDONLY)
        return 0;  /* Python refuses it */
    struct entry *e = entry_get(in->nodeid);
    if (!e)
        return 0;
    uint64_t caps = 0;
    int have_caps = 0;
    char ns[64];
    struct stat st;
    if (e->ns_kind && (ns_link(in->pid, e->ns_kind == 1 ? "pid" : "net", ns, sizeof(ns))
                       || strcmp(ns, e->home_ns)))
        goto decline;  /* another namespace, or unseen: made where the reader is */
    /* uid 0 reads a dumper that is not world-readable only with CAP_SYS_ADMIN (the mode
     * lets in a container's root too); Python refuses the others, and logs it */
    if (in->uid == 0 && (stat(e->pin_path, &st) || !(st.st_mode & S_IROTH))) {
        caps = core_effective_caps(in->pid);
        have_caps = 1;
        if (!(caps & cfg.read_private_caps))
            goto decline;
    }
    if (e->cred && !have_caps)
        caps = core_effective_caps(in->pid);
    uint64_t user_ns = core_pid_ns(in->pid);
    if (core_admit(in->uid, user_ns))
        goto decline;  /* Python refuses it, and says why */
    int fd = iter_create(e->link_fd, e->cred, caps);
    if (fd < 0) {
        core_unadmit(in->uid, user_ns);
        goto decline;  /* Python tries again, and reports the error */
    }
    struct file *f = calloc(1, sizeof(*f));
    if (!f) {
        close(fd);
        core_unadmit(in->uid, user_ns);
        goto decline;
    }
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->idle, NULL);
    f->node.refs = 1;
    f->fd = fd;
    f->e = e;  /* the entry's reference passes to the file */
    f->uid = in->uid;
    f->pid = in->pid;
    f->user_ns = user_ns;
    f->opened_ns = now_ns();
    core_count_open(e->stats);
    pthread_mutex_lock(&files.lock);
    f->node.key = next_fh++ | CORE_FH_BIT | cfg.fh_base;  /* cfg.fh_base: files.py */
    table_add_locked(&files, &f->node);
    pthread_mutex_unlock(&files.lock);
    struct fuse_open_out out = {.fh = f->node.key, .open_flags = cfg.open_flags};
    reply(r, 0, &out, sizeof(out));
    return 1;
decline:
    entry_put(e);
    return 0;
}

/* Keep the last cfg.back bytes served, for Python to serve a seek back once it adopts. */
static void keep_back(struct file *f, const char *data, uint32_t n)
{
    if (!f->back && !(f->back = malloc(cfg.back)))
        return;  /* a seek back then runs the dumper again */
    if (n >= cfg.back) {
        memcpy(f->back, data + n - cfg.back, cfg.back);
        f->back_len = cfg.back;
        return;
    }
    uint32_t keep = f->back_len + n > cfg.back ? cfg.back - n : f->back_len;
    memmove(f->back, f->back + f->back_len - keep, keep);
    memcpy(f->back + keep, data, n);
    f->back_len = keep + n;
}

/* The same, of a reply's iovecs: only those holding its last cfg.back bytes. */
static void keep_back_iov(struct file *f, const struct iovec *iov, int n)
{
    size_t after = 0;
    int i = n;
    while (i > 0 && after < cfg.back)
        after += iov[--i].iov_len;
    for (; i < n; i++)
        keep_back(f, iov[i].iov_base, iov[i].iov_len);
}

/* A READ of a file of ours: what moves with it from thread to thread -- parked with a
 * file busy, or handed from a queue's thread to a worker (io_uring). */
struct job {
    struct job *next;
    struct file *f;
    struct {                       /* the request (/dev/fuse's layout, to forward it) */
        struct fuse_in_header in;
        struct fuse_read_in rd;
    } msg;
    struct queue *q;               /* io_uring: its entry, whose payload holds the data */
    int ent;
    int produce;                   /* not a READ: read ahead for the file's reader */
    uint32_t got;
    uint64_t t0;
    int nlent;                     /* a reply to write (/dev/fuse): iovecs lent by chunks */
    struct iovec lent[MAX_LEND];
    struct chunk *held[MAX_LEND];
};

static char *entry_payload(struct queue *q, int ent);
static uint32_t entry_payload_size(struct queue *q, int ent);

/* Write J's reply from the chunks it lends, and put them back. */
static void reply_lent(const struct req *r, struct job *j)
{
    reply_iov(r, 0, j->lent, j->nlent);
    for (int i = 0; i < j->nlent; i++)
        chunk_put(j->held[i]);
    j->nlent = 0;
}

static struct req job_req(struct job *j)
{
    char *out = j->q ? entry_payload(j->q, j->ent) : NULL;
    return (struct req){&j->msg.in, &j->msg.rd, (const char *)&j->msg, sizeof(j->msg), j->q,
                        j->ent, out};
}

static void post_job(struct job *j);
static void run(struct job *j, int *leading, int on_queue);

/* Kernel reads of F until SIZE bytes are in OUT (j->got so far) or, without OUT
 * (/dev/fuse), in its surplus, to be lent to the reply; or the end or an error
 * (f->ended, f->err). Before a read that may take long -- any, of a dumper not known
 * to be quick, and the next ones of a large dump -- the thread hands the lead off
 * (/dev/fuse, *leading), or, on a queue's thread (io_uring), moves the rest to a
 * worker: returns 0 then, the job being the worker's. */
static int fill(struct job *j, char *out, int *leading, int on_queue)
{
    struct file *f = j->f;
    uint32_t size = j->msg.rd.size, again = 0;
    if (out && f->surplus_len && j->got < size) {
        uint32_t n = f->surplus_len < size - j->got ? f->surplus_len : size - j->got;
        surplus_take(f, n, out + j->got, NULL, NULL);
        j->got += n;
        budget_give(f, n);
    }
    uint64_t t0 = now_ns();
    int read_kernel = 0;
    uint32_t have;
    while ((have = out ? j->got : f->surplus_len) < size && !f->ended) {
        if (!core_pace_quick(f->e->pace) || have >= cfg.kernel_buf / 2) {
            if (on_queue) {
                if (read_kernel)
                    core_pace_record(f->e->pace, now_ns() - t0);
                post_job(j);
                return 0;
            }
            if (leading && *leading) {
                hand_off();
                *leading = 0;
            }
        }
        read_kernel = 1;
        /* room for a whole kernel buffer: the cgroup iterator fails a read after one
         * that left output behind */
        ssize_t n = out ? read(f->fd, out + j->got, cfg.kernel_buf) : surplus_read(f);
        if (n < 0 && errno == EAGAIN && ++again < cfg.max_eagain)
            continue;
        if (n <= 0) {
            f->err = n < 0 ? errno : 0;
            f->ended = 1;
            break;
        }
        again = 0;
        if (!out)
            continue;
        if (j->got + n > size) {  /* a kernel read gives what it has: keep the rest */
            uint32_t extra = j->got + n - size;
            struct chunk *c = chunk_new();  /* the surplus is empty: it was taken first */
            if (!c) {
                f->err = ENOMEM;
                f->ended = 1;
                break;
            }
            memcpy(c->data, out + size, extra);
            c->len = f->surplus_len = extra;
            f->head = f->tail = c;
            n = size - j->got;
        }
        j->got += n;
    }
    if (!out)
        j->got = f->surplus_len < size ? f->surplus_len : size;
    if (read_kernel && !f->err)
        core_pace_record(f->e->pace, now_ns() - t0);
    return 1;
}

/* Whether READ J may be served here now (offset at the position, ...); else the file
 * goes to Python. With f->lock held. */
static int servable(struct file *f, const struct job *j)
{
    int over = lim.open_budget_ns && j->t0 - f->opened_ns > lim.open_budget_ns;
    return !f->python && j->msg.rd.offset == f->pos && !over && !(f->err && !f->surplus_len)
        && j->msg.rd.size <= cfg.max_read;
}

/* The READ parked on busy F, if any (and, with READY, only once surplus can answer it),
 * taken to serve; one that cannot be served here is forwarded (Python adopts the
 * file). With f->lock held. */
static struct job *take_parked(struct file *f, int ready)
{
    struct job *p = f->parked;
    if (!p || (ready && f->surplus_len < p->msg.rd.size && !f->ended))
        return NULL;
    f->parked = NULL;
    if (servable(f, p))
        return p;
    f->python = 1;
    pthread_mutex_unlock(&f->lock);
    struct req r = job_req(p);
    forward(&r);
    file_put(f);  /* the parked job's reference */
    free(p);
    pthread_mutex_lock(&f->lock);
    return NULL;
}

/* Read ahead of F's reader, up to AHEAD bytes in surplus, within the budget, on a
 * thread that may block. Returns early with a READ parked meanwhile, once surplus can
 * answer it; NULL once done. */
static int producing;            /* producers reading ahead now */
static uint64_t last_produced_ns;  /* when one last read */

/* Whether files are being read ahead: a producer runs, or ran within a second (one
 * waits for its reader between READs). */
int core_producing(void)
{
    return __atomic_load_n(&producing, __ATOMIC_RELAXED)
        || now_ns() - __atomic_load_n(&last_produced_ns, __ATOMIC_RELAXED) < 1000000000ULL;
}

static struct job *produce_more(struct file *f, uint32_t ahead);

static struct job *produce(struct file *f, uint32_t ahead)
{
    __atomic_add_fetch(&producing, 1, __ATOMIC_RELAXED);
    struct job *p = produce_more(f, ahead);
    __atomic_sub_fetch(&producing, 1, __ATOMIC_RELAXED);
    return p;
}

static struct job *produce_more(struct file *f, uint32_t ahead)
{
    uint32_t again = 0;
    for (;;) {
        pthread_mutex_lock(&f->lock);
        struct job *p = take_parked(f, 1);
        int waited_for = f->parked != NULL;
        int stop = f->released || f->ended || f->surplus_len >= ahead;
        pthread_mutex_unlock(&f->lock);
        if (p || stop)
            return p;
        /* the next kernel read's room taken from the budget first, so that producers
         * reading at once cannot pass it together; beyond it, only for a waiting READ */
        if (lim.read_ahead) {
            if (waited_for)
                core_budget_add(lim.read_ahead, user_key(f), cfg.kernel_buf);
            else if (!budget_take(lim.read_ahead, user_key(f), cfg.kernel_buf))
                return NULL;
            f->counted += cfg.kernel_buf;
        }
        ssize_t n = surplus_read(f);
        budget_give(f, cfg.kernel_buf - (n > 0 ? n : 0));  /* taken, down to what was read */
        if (n < 0 && errno == EAGAIN && ++again < cfg.max_eagain)
            continue;
        again = 0;
        if (n <= 0) {
            f->err = n < 0 ? errno : 0;
            f->ended = 1;
        } else {
            __atomic_store_n(&last_produced_ns, now_ns(), __ATOMIC_RELAXED);
        }
    }
}

/* Serve job J of busy F, then whatever F was left to do: read ahead for a streaming
 * reader, the READs parked meanwhile; then clear busy. Each job holds a reference
 * of F, put when the job is done. */
static void run(struct job *j, int *leading, int on_queue)
{
    struct file *f = j->f;
    for (;;) {
        struct job *next = NULL;
        if (j->produce) {
            if (leading && *leading) {  /* reading ahead takes kernel reads in a row */
                hand_off();
                *leading = 0;
            }
            next = produce(f, j->msg.rd.size);
            free(j);
        } else if (j->nlent) {
            /* a worker's: the producer reads on meanwhile, on another CPU */
            struct req r = job_req(j);
            reply_lent(&r, j);
            free(j);
            return;  /* the chunks it lent, not the file, were the job's */
        } else {
            struct req r = job_req(j);
            uint32_t size = j->msg.rd.size;
            if (!fill(j, r.out, leading, on_queue))
                return;  /* a worker goes on */
            if (!j->got && f->err) {
                pthread_mutex_lock(&f->lock);
                f->python = 1;  /* Python fails the file, and says why */
                pthread_mutex_unlock(&f->lock);
                forward(&r);
                free(j);
            } else {
                if (r.out) {
                    keep_back(f, r.out, j->got);
                } else {
                    j->nlent = surplus_take(f, j->got, NULL, j->lent, j->held);
                    j->got = 0;
                    for (int i = 0; i < j->nlent; i++)
                        j->got += j->lent[i].iov_len;
                    budget_give(f, j->got);
                    keep_back_iov(f, j->lent, j->nlent);
                }
                f->pos += j->got;
                core_count_read(f->e->stats, j->got, now_ns() - j->t0);
                /* two whole READs in a row, or one larger than a kernel read: a large
                 * dump is being read, and the kernel had better go on while the reply
                 * travels (reader.py) */
                int full = j->got == size;
                f->full_reads = full ? f->full_reads + 1 : 0;
                int streams = f->full_reads >= lim.streaming_after
                    || (full && size > cfg.kernel_buf);
                /* room for the largest READ so far, and as much again twice, within
                 * max_ahead beyond it (a reader's READs come in pieces: a buffer that
                 * is not page-aligned splits a 1 MiB read(2) in two) */
                if (size > f->largest)
                    f->largest = size;
                uint32_t extra = (lim.read_ahead_reads - 1) * f->largest;
                uint32_t ahead = f->largest + (extra < lim.max_ahead ? extra : lim.max_ahead);
                int produce = streams && lim.read_ahead_reads && !f->ended
                    && f->surplus_len < ahead
                    && !(lim.read_ahead && core_budget_spent(lim.read_ahead, user_key(f)));
                /* a large reply to write while the kernel reads on is a worker's: writing
                 * 1 MiB to /dev/fuse takes 0.3-1.5 ms */
                struct job *w = produce && j->got > LARGE_REPLY && j->nlent
                    ? malloc(sizeof(*w)) : NULL;
                if (w) {
                    *w = *j;
                    post_job(w);
                } else if (j->nlent) {
                    reply_lent(&r, j);
                } else {
                    reply(&r, 0, r.out, j->got);
                }
                if (produce) {
                    *j = (struct job){.f = f, .produce = 1, .msg.rd.size = ahead};
                    if (on_queue) {
                        post_job(j);
                        return;
                    }
                    continue;
                }
                free(j);
            }
        }
        pthread_mutex_lock(&f->lock);
        if (!next)
            next = take_parked(f, 0);
        if (!next) {
            f->busy = 0;
            pthread_cond_broadcast(&f->idle);
        }
        pthread_mutex_unlock(&f->lock);
        file_put(f);  /* the finished job's reference */
        if (!next)
            return;
        j = next;
        j->t0 = now_ns();
    }
}

/* Serve a READ of a file of ours, or return 0 to forward it (to Python, which adopts
 * the file). */
static int read_file(const struct req *r, int *leading)
{
    const struct fuse_read_in *rd = r->body;
    struct file *f = file_get(rd->fh);
    if (!f)
        return 0;
    struct job *j = calloc(1, sizeof(*j));
    if (!j) {
        file_put(f);
        reply(r, ENOMEM, NULL, 0);
        return 1;
    }
    j->f = f;
    j->msg.in = *r->in;
    j->msg.rd = *rd;
    j->q = r->q;
    j->ent = r->ent;
    j->t0 = now_ns();
    pthread_mutex_lock(&f->lock);
    if (f->busy && !f->parked && !f->python) {
        f->parked = j;  /* answered by the thread that reads it now */
        pthread_mutex_unlock(&f->lock);
        return 1;
    }
    if (f->busy || !servable(f, j)) {
        f->python = 1;  /* from now on every request of it goes to Python */
        pthread_mutex_unlock(&f->lock);
        file_put(f);
        free(j);
        return 0;
    }
    f->busy = 1;
    pthread_mutex_unlock(&f->lock);
    run(j, leading, r->q != NULL);
    return 1;
}

/* Serve a GETATTR of a published dumper as ops._file_attr answers it, or return 0 to
 * forward it: a pin gone or replaced is Python's to find out. */
static int getattr_file(const struct req *r)
{
    struct entry *e = entry_get(r->in->nodeid);
    if (!e)
        return 0;
    struct stat st;
    int ours = !lstat(e->pin_path, &st) && S_ISREG(st.st_mode) && st.st_ino == e->pin_ino;
    entry_put(e);
    if (!ours)
        return 0;
    struct fuse_attr_out out = {.attr_valid = cfg.attr_valid, .attr = {
        .ino = r->in->nodeid, .size = 0,  /* unknown until read: made at each open */
        .atime = st.st_atim.tv_sec, .atimensec = st.st_atim.tv_nsec,
        .mtime = st.st_mtim.tv_sec, .mtimensec = st.st_mtim.tv_nsec,
        .ctime = st.st_ctim.tv_sec, .ctimensec = st.st_ctim.tv_nsec,
        .mode = S_IFREG | (st.st_mode & 07777), .nlink = 1, .uid = st.st_uid,
        .gid = st.st_gid, .blksize = cfg.blksize}};
    reply(r, 0, &out, sizeof(out));
    return 1;
}

static int release_file(const struct req *r)
{
    struct file *f = file_unlink(((const struct fuse_release_in *)r->body)->fh);
    if (!f)
        return 0;
    /* closes now unless a read is still in the kernel (a killed reader's RELEASE comes
     * while its read runs): the read's reference closes it */
    file_release(f);
    reply(r, 0, NULL, 0);
    return 1;
}

/* GETXATTR names answered without a look at the file (ops.XATTR_REFUSALS): the first
 * prefix a name starts with gives the errno, 0 for Python to answer. */
#define MAX_XATTR_RULES 8
static struct { char prefix[32]; size_t len; int err; } xattr_rules[MAX_XATTR_RULES];
static int nxattr_rules;

/* Add a rule; a NULL PREFIX clears them. */
int core_xattr_rule(const char *prefix, int err)
{
    if (!prefix) {
        nxattr_rules = 0;
        return 0;
    }
    if (nxattr_rules == MAX_XATTR_RULES || strlen(prefix) >= sizeof(xattr_rules[0].prefix))
        return ENOSPC;
    snprintf(xattr_rules[nxattr_rules].prefix, sizeof(xattr_rules[0].prefix), "%s", prefix);
    xattr_rules[nxattr_rules].len = strlen(prefix);
    xattr_rules[nxattr_rules++].err = err;
    return 0;
}

static int getxattr_refused(const struct req *r)
{
    const char *name;
    size_t len;
    if (r->q) {
        name = entry_payload(r->q, r->ent);
        len = entry_payload_size(r->q, r->ent);
    } else {
        size_t head = sizeof(struct fuse_in_header) + sizeof(struct fuse_getxattr_in);
        if (r->raw_len <= head)
            return 0;
        name = (const char *)r->body + sizeof(struct fuse_getxattr_in);
        len = r->raw_len - head;
    }
    len = strnlen(name, len);
    for (int i = 0; i < nxattr_rules; i++)
        if (len >= xattr_rules[i].len && !memcmp(name, xattr_rules[i].prefix, xattr_rules[i].len)) {
            if (xattr_rules[i].err)
                reply(r, xattr_rules[i].err, NULL, 0);
            return xattr_rules[i].err != 0;
        }
    return 0;
}

/* Serve or forward one request; *leading (/dev/fuse) says whether this thread leads. */
static void dispatch(const struct req *r, int *leading)
{
    int served = 0;
    if (!debug)
        switch (r->in->opcode) {
        case FUSE_OPEN:
            served = open_file(r);
            break;
        case FUSE_READ:
            served = (((const struct fuse_read_in *)r->body)->fh & CORE_FH_BIT)
                && read_file(r, leading);
            break;
        case FUSE_RELEASE:
            served = (((const struct fuse_release_in *)r->body)->fh & CORE_FH_BIT)
                && release_file(r);
            break;
        case FUSE_GETXATTR:
            served = getxattr_refused(r);
            break;
        case FUSE_GETATTR:
            served = getattr_file(r);
            break;
        case FUSE_INTERRUPT:
            /* nothing here can stop a kernel read midway: the request completes */
            served = 1;
            break;
        }
    if (!served)
        forward(r);
}

/* -- /dev/fuse's threads ----------------------------------------------------------------- */
static void spawn(void);

static void hand_off(void)
{
    pthread_mutex_lock(&pool_lock);
    if (!waiting && threads < max_threads)
        spawn();
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&lead);
}

/* The next request, spinning cfg.spin_ns before sleeping: a reader's next request
 * follows its last answer within tens of us, and on a VM a vCPU that halts pays a
 * hypervisor exit and an IPI to wake. O_NONBLOCK is the leader's alone to change. */
static ssize_t next_request(char *buf)
{
    uint64_t deadline = 0;
    for (;;) {
        ssize_t n = read(dev_fd, buf, cfg.bufsize);
        if (n >= 0 || errno != EAGAIN)
            return n;
        uint64_t now = now_ns();
        if (!deadline)
            deadline = now + cfg.spin_ns;
        else if (now > deadline) {
            int fl = fcntl(dev_fd, F_GETFL);
            fcntl(dev_fd, F_SETFL, fl & ~O_NONBLOCK);
            n = read(dev_fd, buf, cfg.bufsize);
            int saved = errno;
            fcntl(dev_fd, F_SETFL, fl);
            errno = saved;
            return n;
        }
    }
}

static void *work(void *arg)
{
    (void)arg;
    size_t req_size = cfg.bufsize;
    /* mapped: pages are touched only as requests fill them */
    char *buf = mmap(NULL, req_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (;;) {
        pthread_mutex_lock(&pool_lock);
        if (waiting >= MAX_WAITING || dead || buf == MAP_FAILED) {
            threads--;
            pthread_mutex_unlock(&pool_lock);
            break;
        }
        waiting++;
        pthread_mutex_unlock(&pool_lock);
        pthread_mutex_lock(&lead);
        pthread_mutex_lock(&pool_lock);
        waiting--;
        pthread_mutex_unlock(&pool_lock);
        int leading = 1;
        while (leading) {
            if (__atomic_load_n(&dead, __ATOMIC_ACQUIRE)) {
                pthread_mutex_unlock(&lead);
                break;
            }
            ssize_t n = next_request(buf);
            if (n < 0) {
                if (errno == ENOENT || errno == EINTR || errno == EAGAIN)
                    continue;  /* ENOENT: interrupted before we took it */
                if (errno != ENODEV)
                    fprintf(stderr, "bpfdumpfs core: reading /dev/fuse: %s\n",
                            strerror(errno));
                __atomic_store_n(&dead, 1, __ATOMIC_RELEASE);
                shutdown(fwd_fd, SHUT_WR);  /* Python's workers see the end */
                pthread_cond_broadcast(&job_cond);
                pthread_mutex_unlock(&lead);
                break;
            }
            if (__atomic_load_n(&draining, __ATOMIC_ACQUIRE))
                continue;  /* left unanswered: the kernel sends it again to the next server */
            const struct fuse_in_header *in = (const void *)buf;
            struct req r = {in, buf + sizeof(*in), buf, n, NULL, 0, NULL};
            dispatch(&r, &leading);
        }
    }
    if (buf != MAP_FAILED)
        munmap(buf, req_size);
    return NULL;
}

static void start_thread(void *(*fn)(void *), void *arg, const char *name)
{
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    if (pthread_create(&t, &attr, fn, arg) == 0) {
        pthread_setname_np(t, name);
        if (fn == work)
            threads++;
    }
    pthread_attr_destroy(&attr);
}

/* with pool_lock held */
static void spawn(void)
{
    start_thread(work, NULL, "fuse-core");
}

/* -- FUSE over io_uring ------------------------------------------------------------------
 * Since Linux 6.14 (CONFIG_FUSE_IO_URING, fuse.enable_uring=Y: the operator's switch)
 * the kernel queues a request on the ring of the CPU its reader runs on, served here
 * by a thread pinned to that CPU: no cross-CPU wake-up per request. The protocol
 * (fs/fuse/dev_uring.c): INIT still comes through /dev/fuse, and its reply (libfuse's,
 * relayed by device.py) asks for io_uring; each queue then REGISTERs entries -- a
 * 288-byte header and a payload -- and answers with COMMIT_AND_FETCH, which also
 * hands the entry back for the next request. FORGET, INTERRUPT and notifications
 * still pass through /dev/fuse, read by the threads above.
 *
 * Submissions to a ring are made by its queue's thread only (an entry's next request
 * completes as task work of the thread that submitted its command): an answer made
 * elsewhere -- a worker's read, Python's -- is posted to the queue's thread, which an
 * eventfd read pending on its ring wakes. */
#define URING_HEADER 288          /* struct fuse_uring_req_header */
#define URING_OP_IN 128           /* where its per-opcode struct starts */
#define URING_ENT 256             /* struct fuse_uring_ent_in_out: flags, commit_id, payload_sz */
#define URING_REGISTER 1
#define URING_COMMIT_AND_FETCH 2
#define FIRST_ENTRIES 2
#define SPARE_ENTRIES 1
#define MAX_ENTRIES 64
#define WAKE UINT64_MAX

struct fuse_uring_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };

struct ring {
    int fd;
    unsigned *sq_tail, sq_mask, *cq_head, *cq_tail, cq_mask;
    struct io_uring_cqe *cqes;
    char *sqes;
    unsigned pending;
    void *maps[3];
    size_t sizes[3];
};

struct queue {
    int qid, efd, live, nents, busy;
    pid_t tid;
    struct ring ring;
    char *headers[MAX_ENTRIES], *payloads[MAX_ENTRIES];
    struct iovec iovs[MAX_ENTRIES][2];
    pthread_mutex_t lock;          /* guards posted */
    int posted[MAX_ENTRIES], nposted;
    uint64_t wake_buf;
    char *fwd;                     /* a request rebuilt as /dev/fuse gives it, for Python */
    int trim[MAX_ENTRIES], ntrim;  /* entries whose large reply is committed by the next enter */
};

static struct queue **queues;
static int nqueues;
static uint32_t payload_size;
static __thread struct queue *my_queue;

/* requests forwarded to Python from a ring, by unique: where its answer goes */
struct flight { struct flight *next; uint64_t unique; struct queue *q; int ent; };
static pthread_mutex_t flight_lock = PTHREAD_MUTEX_INITIALIZER;
static struct flight *flights[TABLE];

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cond = PTHREAD_COND_INITIALIZER;  /* jobs posted, or the end */
static struct job *jobs_head, *jobs_tail;
static int job_idle, job_threads;

static int ring_setup(struct ring *r, unsigned entries)
{
    struct io_uring_params p = {.flags = IORING_SETUP_SQE128};
    r->fd = syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0)
        return -1;
    r->sizes[0] = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->sizes[1] = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->sizes[0] = r->sizes[1] = r->sizes[0] > r->sizes[1] ? r->sizes[0] : r->sizes[1];
    r->sizes[2] = p.sq_entries * 128;
    r->maps[0] = mmap(NULL, r->sizes[0], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      r->fd, IORING_OFF_SQ_RING);
    r->maps[1] = p.features & IORING_FEAT_SINGLE_MMAP ? r->maps[0]
        : mmap(NULL, r->sizes[1], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
               IORING_OFF_CQ_RING);
    r->maps[2] = mmap(NULL, r->sizes[2], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      r->fd, IORING_OFF_SQES);
    if (r->maps[0] == MAP_FAILED || r->maps[1] == MAP_FAILED || r->maps[2] == MAP_FAILED)
        return -1;
    char *sq = r->maps[0], *cq = r->maps[1];
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++)
        array[i] = i;
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sqes = r->maps[2];
    return 0;
}

static struct io_uring_sqe *ring_push(struct ring *r)
{
    unsigned tail = *r->sq_tail;
    struct io_uring_sqe *sqe = (void *)(r->sqes + (size_t)(tail & r->sq_mask) * 128);
    memset(sqe, 0, 128);
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->pending++;
    return sqe;
}

static int ring_enter(struct ring *r)
{
    int n = syscall(__NR_io_uring_enter, r->fd, r->pending, 1, IORING_ENTER_GETEVENTS, NULL, 0);
    if (n < 0)
        return errno == EINTR || errno == EAGAIN || errno == EBUSY ? 0 : -1;
    r->pending -= n;
    return 0;
}

static void uring_cmd(struct queue *q, int ent, unsigned cmd, uint64_t commit_id)
{
    struct io_uring_sqe *sqe = ring_push(&q->ring);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = dev_fd;
    sqe->cmd_op = cmd;
    sqe->user_data = ent;
    if (cmd == URING_REGISTER) {
        sqe->addr = (uintptr_t)q->iovs[ent];
        sqe->len = 2;
    }
    struct fuse_uring_cmd_req *req = (void *)sqe->cmd;
    req->commit_id = commit_id;
    req->qid = q->qid;
}

static int add_entry(struct queue *q)
{
    int ent = q->nents;
    size_t room = payload_size + cfg.kernel_buf;  /* a READ's last kernel read may overshoot */
    char *h = calloc(1, URING_HEADER);
    char *p = mmap(NULL, room, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!h || p == MAP_FAILED) {
        free(h);
        if (p != MAP_FAILED)
            munmap(p, room);
        return -1;
    }
    q->headers[ent] = h;
    q->payloads[ent] = p;
    q->iovs[ent][0] = (struct iovec){h, URING_HEADER};
    q->iovs[ent][1] = (struct iovec){p, payload_size};
    q->nents++;
    q->live++;
    uring_cmd(q, ent, URING_REGISTER, 0);
    return 0;
}

static void arm_wake(struct queue *q)
{
    struct io_uring_sqe *sqe = ring_push(&q->ring);
    sqe->opcode = IORING_OP_READ;
    sqe->fd = q->efd;
    sqe->addr = (uintptr_t)&q->wake_buf;
    sqe->len = 8;
    sqe->user_data = WAKE;
}


static char *entry_payload(struct queue *q, int ent)
{
    return q->payloads[ent];
}

/* the size of the request's data in the payload (a name, for GETXATTR) */
static uint32_t entry_payload_size(struct queue *q, int ent)
{
    uint32_t size;
    memcpy(&size, q->headers[ent] + URING_ENT + 16, 4);
    return size;
}

static void commit(struct queue *q, int ent)
{
    uint64_t commit_id;
    uint32_t size;
    memcpy(&commit_id, q->headers[ent] + URING_ENT + 8, 8);
    memcpy(&size, q->headers[ent] + URING_ENT + 16, 4);
    if (size > KEEP_TOUCHED)
        q->trim[q->ntrim++] = ent;
    q->busy--;
    uring_cmd(q, ent, URING_COMMIT_AND_FETCH, commit_id);
}

/* Write the answer into the entry; committed by the queue's thread. */
static void ring_reply(struct queue *q, int ent, uint64_t unique, int err, const struct iovec *iov,
                       int n)
{
    char *h = q->headers[ent], *p = q->payloads[ent];
    uint32_t size = 0, total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    if (!err && total > payload_size)
        err = EIO;  /* cannot be: no request asks for more than a payload holds */
    for (int i = 0; i < n && !err; i++) {
        if (iov[i].iov_base != p + size && iov[i].iov_len)
            memmove(p + size, iov[i].iov_base, iov[i].iov_len);
        size += iov[i].iov_len;
    }
    struct fuse_out_header out = {sizeof(out) + size, -err, unique};
    memcpy(h, &out, sizeof(out));
    memcpy(h + URING_ENT + 16, &size, 4);
    if (my_queue == q) {
        commit(q, ent);
        return;
    }
    pthread_mutex_lock(&q->lock);
    q->posted[q->nposted++] = ent;
    pthread_mutex_unlock(&q->lock);
    uint64_t one = 1;
    if (write(q->efd, &one, 8) < 0)
        fprintf(stderr, "bpfdumpfs core: waking queue %d: %s\n", q->qid, strerror(errno));
}

/* Send a ring's request to Python, rebuilt as /dev/fuse gives it. */
static int ring_forward(const struct req *r)
{
    struct queue *q = r->q;
    const char *h = q->headers[r->ent];
    uint32_t payload_sz, len = r->in->len;
    memcpy(&payload_sz, h + URING_ENT + 16, 4);
    uint32_t op = len - sizeof(*r->in) - payload_sz;
    if (len < sizeof(*r->in) + payload_sz || op > URING_ENT - URING_OP_IN || len > cfg.bufsize)
        return -1;
    /* on a worker (a READ that failed) the queue's buffer may be in use */
    char *buf = my_queue == q ? q->fwd : malloc(len);
    if (!buf)
        return -1;
    memcpy(buf, h, sizeof(*r->in));
    memcpy(buf + sizeof(*r->in), h + URING_OP_IN, op);
    memcpy(buf + sizeof(*r->in) + op, q->payloads[r->ent], payload_sz);
    struct flight *fl = malloc(sizeof(*fl));
    if (!fl) {
        if (buf != q->fwd)
            free(buf);
        return -1;
    }
    *fl = (struct flight){NULL, r->in->unique, q, r->ent};
    pthread_mutex_lock(&flight_lock);
    fl->next = flights[fl->unique % TABLE];
    flights[fl->unique % TABLE] = fl;
    pthread_mutex_unlock(&flight_lock);
    int failed = send(fwd_fd, buf, len, MSG_NOSIGNAL) < 0;
    if (buf != q->fwd)
        free(buf);
    if (failed) {
        pthread_mutex_lock(&flight_lock);
        struct flight **pp = &flights[fl->unique % TABLE];
        while (*pp != fl)
            pp = &(*pp)->next;
        *pp = fl->next;
        pthread_mutex_unlock(&flight_lock);
        free(fl);
    }
    return failed ? -1 : 0;
}

/* An answer from Python (IOV: a fuse_out_header, then its data): to the ring entry of
 * its request, or else (/dev/fuse, notifications) written to /dev/fuse. -errno. */
int core_reply(const struct iovec *iov, int n)
{
    struct fuse_out_header out;
    if (n < 1 || iov[0].iov_len < sizeof(out))
        return -EINVAL;
    memcpy(&out, iov[0].iov_base, sizeof(out));
    struct flight *fl = NULL;
    if (out.unique && nqueues) {
        pthread_mutex_lock(&flight_lock);
        struct flight **pp = &flights[out.unique % TABLE];
        while (*pp && (*pp)->unique != out.unique)
            pp = &(*pp)->next;
        if ((fl = *pp))
            *pp = fl->next;
        pthread_mutex_unlock(&flight_lock);
    }
    if (!fl)
        return writev(dev_fd, iov, n) < 0 ? -errno : 0;
    struct iovec data[n];
    data[0] = (struct iovec){(char *)iov[0].iov_base + sizeof(out), iov[0].iov_len - sizeof(out)};
    for (int i = 1; i < n; i++)
        data[i] = iov[i];
    ring_reply(fl->q, fl->ent, out.unique, -out.error, data, n);
    free(fl);
    return 0;
}

static void *run_jobs(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&job_lock);
        while (!jobs_head && !__atomic_load_n(&dead, __ATOMIC_ACQUIRE)
               && job_idle < MAX_WAITING) {
            job_idle++;
            pthread_cond_wait(&job_cond, &job_lock);
            job_idle--;
        }
        struct job *j = jobs_head;
        if (!j) {
            job_threads--;
            pthread_mutex_unlock(&job_lock);
            return NULL;
        }
        jobs_head = j->next;
        pthread_mutex_unlock(&job_lock);
        run(j, NULL, 0);
    }
}

static void post_job(struct job *j)
{
    j->next = NULL;
    pthread_mutex_lock(&job_lock);
    if (jobs_head)
        jobs_tail->next = j;
    else
        jobs_head = j;
    jobs_tail = j;
    if (job_idle)
        pthread_cond_signal(&job_cond);
    else if (job_threads < max_threads) {
        job_threads++;
        start_thread(run_jobs, NULL, "fuse-read");
    }
    pthread_mutex_unlock(&job_lock);
}

static void take(struct queue *q, int ent)
{
    q->busy++;
    /* a request holds its entry until answered, and the kernel makes the queue's other
     * requests wait for a free one */
    if (q->nents - q->busy < SPARE_ENTRIES && q->nents < MAX_ENTRIES)
        add_entry(q);
    const char *h = q->headers[ent];
    struct req r = {(const void *)h, h + URING_OP_IN, NULL, 0, q, ent, q->payloads[ent]};
    dispatch(&r, NULL);
}

static int idle_class = -1;  /* queue threads in SCHED_IDLE (1) or SCHED_OTHER (0) */

static void set_class(struct queue *q, int idle)
{
    struct sched_param none = {0};
    sched_setscheduler(q->tid, idle ? SCHED_IDLE : SCHED_OTHER, &none);
}

/* Put the queue threads in SCHED_IDLE, or back. On an idle machine a reader woken by
 * its queue's thread would be moved to another, idle CPU -- the reader's own is busy
 * with that thread at that moment -- and its next request then wakes that CPU from a
 * halt: a hypervisor exit and an IPI each time. A CPU running only SCHED_IDLE threads
 * counts as idle, so the reader stays. Under CPU pressure SCHED_IDLE would starve the
 * queues; core.py turns it off then. */
void core_uring_idle_class(int idle)
{
    idle_class = idle;
    for (int i = 0; i < __atomic_load_n(&nqueues, __ATOMIC_ACQUIRE); i++)
        if (__atomic_load_n(&queues[i]->tid, __ATOMIC_ACQUIRE))
            set_class(queues[i], idle);
}

static void *serve_queue(void *arg)
{
    struct queue *q = arg;
    my_queue = q;
    __atomic_store_n(&q->tid, gettid(), __ATOMIC_RELEASE);
    if (idle_class >= 0)
        set_class(q, idle_class);
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(q->qid, &cpus);
    /* a CPU possible but not online: its queue serves from anywhere */
    pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
    for (int i = 0; i < FIRST_ENTRIES; i++)
        add_entry(q);
    arm_wake(q);
    while (q->live) {
        int ntrim = q->ntrim;
        if (ring_enter(&q->ring)) {
            fprintf(stderr, "bpfdumpfs core: io_uring queue %d: %s\n", q->qid, strerror(errno));
            break;
        }
        /* the kernel copied those replies at their commit, in this enter: the pages
         * beyond KEEP_TOUCHED go back (1 MiB per entry otherwise stays resident) */
        if (q->ring.pending)
            ntrim = 0;  /* not all submitted yet: their replies may be still to copy */
        for (int i = 0; i < ntrim; i++)
            madvise(q->payloads[q->trim[i]] + KEEP_TOUCHED,
                    payload_size + cfg.kernel_buf - KEEP_TOUCHED, MADV_DONTNEED);
        memmove(q->trim, q->trim + ntrim, (q->ntrim - ntrim) * sizeof(int));
        q->ntrim -= ntrim;
        unsigned head = *q->ring.cq_head, tail = __atomic_load_n(q->ring.cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &q->ring.cqes[head & q->ring.cq_mask];
            uint64_t ud = c->user_data;
            int res = c->res;
            __atomic_store_n(q->ring.cq_head, head + 1, __ATOMIC_RELEASE);
            if (ud == WAKE) {
                pthread_mutex_lock(&q->lock);
                int posted[MAX_ENTRIES], n = q->nposted;
                memcpy(posted, q->posted, n * sizeof(int));
                q->nposted = 0;
                pthread_mutex_unlock(&q->lock);
                for (int i = 0; i < n; i++)
                    commit(q, posted[i]);
                arm_wake(q);
            } else if (res < 0) {
                if (res != -ENOTCONN && res != -ECANCELED)
                    fprintf(stderr, "bpfdumpfs core: io_uring queue %d entry %d: %s\n",
                            q->qid, (int)ud, strerror(-res));
                q->live--;  /* unmounted (or refused): the kernel's no more */
            } else {
                take(q, (int)ud);
            }
        }
    }
    return NULL;
}

static int possible_cpus(void)
{
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    int lo = 0, hi = 0, n = 0;
    if (!f)
        return -1;
    /* "0-N", or "0": CPUs are numbered from 0 up on every machine the kernel runs */
    if (fscanf(f, "%d-%d", &lo, &hi) == 2)
        n = hi + 1;
    else
        n = lo + 1;
    fclose(f);
    return n;
}

/* One queue per possible CPU, the kernel's condition to use any. */
int core_start_uring(uint32_t payload)
{
    int n = possible_cpus();
    if (n <= 0)
        return ENOENT;
    payload_size = payload;
    struct queue **qs = calloc(n, sizeof(*qs));
    if (!qs)
        return ENOMEM;
    for (int i = 0; i < n; i++) {
        struct queue *q = qs[i] = calloc(1, sizeof(*q));
        if (!q || ring_setup(&q->ring, 2 * MAX_ENTRIES + 2)
            || (q->efd = eventfd(0, EFD_CLOEXEC)) < 0 || !(q->fwd = malloc(cfg.bufsize)))
            return errno ? errno : ENOMEM;
        q->qid = i;
        pthread_mutex_init(&q->lock, NULL);
    }
    queues = qs;
    __atomic_store_n(&nqueues, n, __ATOMIC_RELEASE);
    for (int i = 0; i < n; i++) {
        char name[16];
        snprintf(name, sizeof(name), "fuse-uring-%d", i);
        start_thread(serve_queue, qs[i], name);
    }
    return 0;
}

int core_uring_queues(void)
{
    return __atomic_load_n(&nqueues, __ATOMIC_ACQUIRE);
}

/* -- set-up ---------------------------------------------------------------------------- */
int core_init(uint64_t quick, uint32_t learn)
{
    quick_ns = quick;
    learn_reads = learn;
    if (readlink("/proc/self/ns/user", init_userns, sizeof(init_userns) - 1) < 0)
        return errno;
    return 0;
}

void core_set_buckets(const double *b, int n)
{
    nbuckets = n < MAX_BUCKETS ? n : MAX_BUCKETS;
    memcpy(buckets, b, nbuckets * sizeof(double));
}

void core_set_limits(const struct core_limits *l)
{
    lim = *l;
}

int core_start(int dev, int fwd, const struct core_config *c, int first_threads,
               int most_threads, int debugging)
{
    cfg = *c;
    max_threads = most_threads;
    debug = debugging;
    dev_fd = dev;
    fwd_fd = fwd;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < first_threads; i++)
        spawn();
    int started = threads;
    pthread_mutex_unlock(&pool_lock);
    return started ? 0 : EAGAIN;
}
