"""Builds bpfdumpfs._core (cffi API mode) from core.c, at install (setup.py)."""
from __future__ import annotations

import pathlib

import cffi

HERE = pathlib.Path(__file__).parent

CDEF = """
    struct core_pace { int refs; uint64_t reads; double avg_ns; };
    struct core_stats { uint64_t opens; int64_t handles; uint64_t bytes; uint64_t latency_ns;
                        uint64_t latency[33]; };
    struct core_config { uint64_t spin_ns; uint32_t kernel_buf, max_eagain, back, max_read,
                         bufsize, open_flags, blksize, attr_valid;
                         uint64_t read_private_caps, fh_base; };
    struct core_budget;
    struct core_limits { uint32_t max_files, max_user_files; uint64_t open_budget_ns;
                         struct core_budget *read_ahead;
                         uint32_t streaming_after, read_ahead_reads, max_ahead; };
    struct core_budget *core_budget_new(uint64_t limit, double share);
    void core_budget_add(struct core_budget *b, uint64_t key, int64_t n);
    int core_budget_spent(struct core_budget *b, uint64_t key);
    uint64_t core_budget_held(struct core_budget *b, uint64_t key, int all);
    uint32_t core_budget_users(struct core_budget *b);
    struct core_adopted { int fd, link_fd, err, ended; uint32_t uid, pid;
                          uint64_t user_ns, pos, opened_ns; uint32_t back_len, surplus_len;
                          char *surplus; struct core_pace *pace; char label[512]; };

    struct core_pace *core_pace_new(void);
    void core_pace_put(struct core_pace *p);
    int core_pace_quick(const struct core_pace *p);
    void core_pace_record(struct core_pace *p, uint64_t ns);
    struct core_stats *core_stats_new(void);
    void core_count_open(struct core_stats *s);
    void core_count_close(struct core_stats *s);
    void core_count_read(struct core_stats *s, uint64_t nbytes, uint64_t ns);
    int core_admit(uint32_t uid, uint64_t ns);
    void core_unadmit(uint32_t uid, uint64_t ns);
    uint32_t core_files(uint32_t uid, uint64_t ns, uint32_t *mine);
    uint64_t core_user_key(uint32_t uid, uint64_t ns);
    uint64_t core_pid_ns(uint32_t pid);
    uint64_t core_effective_caps(uint32_t pid);
    int core_publish(uint64_t nodeid, int link_fd, const char *label, const char *pin_path,
                     uint64_t pin_ino, int ns_kind, const char *home_ns, int cred,
                     struct core_stats *stats, struct core_pace *pace);
    void core_unpublish(uint64_t nodeid);
    int core_adopt(uint64_t fh, struct core_adopted *a, char *back);
    void core_free(void *p);
    void core_release_all(void);
    void core_drain(void);
    int core_init(uint64_t quick, uint32_t learn);
    void core_set_buckets(const double *b, int n);
    void core_set_limits(const struct core_limits *l);
    int core_start(int dev, int fwd, const struct core_config *c, int first_threads,
                   int most_threads, int debugging);
    int core_xattr_rule(const char *prefix, int err);
    int core_producing(void);
    void core_trim(int all);
    struct iovec { void *iov_base; size_t iov_len; };
    int core_reply(const struct iovec *iov, int n);
    int core_start_uring(uint32_t payload);
    int core_uring_queues(void);
    void core_uring_idle_class(int idle);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("bpfdumpfs._core", (HERE / "core.c").read_text(),
                      extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
                      libraries=["pthread"])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
