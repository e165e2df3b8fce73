/* Committing small files atomically (indexes, the manifest, configs and
 * tokenizer files): write "PATH.tmp.<pid>", fsync, close, rename over PATH,
 * fsync the directory. Readers see the old PATH or the complete new one.
 *
 * Fault seam (io/ms_fault.h): every write(2) asks ms_fault_hit(MS_FAULT_WRITE),
 * every fsync(2) (file and directory) MS_FAULT_FSYNC, the rename(2)
 * MS_FAULT_RENAME; a hit fails as EIO.
 *
 * All functions block on disk I/O and are safe to call from any thread (for
 * different paths). */
#ifndef MS_ATOMIC_FILE_H
#define MS_ATOMIC_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "io/ms_error.h"

/* Replaces path with the len bytes at data (mode 0644). Returns 0, or -1 with
 * err set (MS_EXIT_RUNTIME, message naming the temp file or path). On failure
 * the temp file is gone, and so is path itself when the failure came after
 * the rename (the directory fsync): a failed call never leaves a file that
 * may not be durable under path. path's previous content survives only a
 * failure before the rename. */
int ms_atomic_write_file(const char *path, const void *data, size_t len, ms_error *err);

/* Copies the regular file src to dst with the same commit protocol and the
 * same failure guarantees as ms_atomic_write_file (dst's mode is 0644).
 * Streams through a small buffer, so any size works. Returns 0 or -1 with err
 * set (naming src for read errors, the temp file or dst for write errors). */
int ms_copy_file_atomic(const char *src, const char *dst, ms_error *err);

/* fsyncs the directory dir ("" means "."), making renames and unlinks in it
 * durable. A file system that cannot fsync directories (EINVAL, ENOTSUP) is
 * not an error. Returns 0 or -1 with err set (naming dir). */
int ms_fsync_dir(const char *dir, ms_error *err);

/* Creates every missing directory above path (mode 0755), as mkdir -p of
 * its dirname: an output directory may name folders that do not exist yet.
 * path itself is left to the caller. Returns 0 or -1 with err set
 * (MS_EXIT_RUNTIME naming the directory that could not be made). */
int ms_mkdir_parents(const char *path, ms_error *err);

/* fsyncs the directory that holds path (its dirname, "." when path has no
 * slash). Same returns as ms_fsync_dir. */
int ms_fsync_parent_dir(const char *path, ms_error *err);

/* Low-level durable-write helpers, shared with the shard writer. */

/* pwrite(2)s all len bytes at offset, looping on short writes and EINTR;
 * asks ms_fault_hit(MS_FAULT_WRITE) before each call. Returns 0 or -errno
 * (-EIO for an injected fault or a write that makes no progress). */
int ms_pwrite_all(int fd, const void *buf, size_t len, uint64_t offset);

/* The reading side, for every reader of tensor bytes and spill files:
 * pread(2)s exactly len bytes at offset, looping on short reads and EINTR;
 * asks ms_fault_hit(MS_FAULT_READ) before each call. Returns 0, -errno
 * (-EIO for an injected fault), or -ENODATA when the file ends first (it
 * shrank since it was measured). */
int ms_pread_all(int fd, void *buf, size_t len, uint64_t offset);

/* ms_pread_all with its error in err, naming path: MS_EXIT_RUNTIME "read
 * failed" with the errno, or MS_EXIT_DATA "file ended early (changed while
 * reading?)". Returns 0 or -1. */
int ms_pread_exact(int fd, const char *path, void *buf, size_t len, uint64_t offset, ms_error *err);

/* fsync(2) behind ms_fault_hit(MS_FAULT_FSYNC). Returns 0 or -errno. */
int ms_fsync_fd(int fd);

/* rename(2) behind ms_fault_hit(MS_FAULT_RENAME). Returns 0 or -errno. */
int ms_rename(const char *from, const char *to);

#endif
