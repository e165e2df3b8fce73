/* Reads that bypass the page cache (O_DIRECT): for a merge whose inputs
 * cannot stay cached anyway (larger than the memory left for the page cache,
 * or a memory cgroup's limit), reading through the cache only costs a copy
 * and the kernel's work of filling and evicting it (pipeline/merge_run.c).
 *
 * O_DIRECT moves whole blocks: a read starts at a multiple of
 * MS_DIRECT_ALIGN in the file, into memory aligned the same, for a multiple
 * of MS_DIRECT_ALIGN bytes. A tensor at any offset is read as the blocks that
 * cover it, and its bytes start ms_direct_head(offset) bytes into the
 * buffer. 4096 covers the logical block size and memory alignment of every
 * common device (512 or 4096); a file system asking for more refuses the
 * probe read, and that file is read through the page cache. */
#ifndef MS_DIRECT_READ_H
#define MS_DIRECT_READ_H

#include <stdint.h>

#define MS_DIRECT_ALIGN 4096u

/* Bytes between the block holding `offset` and `offset`. */
static inline uint64_t ms_direct_head(uint64_t offset) { return offset % MS_DIRECT_ALIGN; }

/* Bytes of the block-aligned read that covers [offset, offset + len). */
static inline uint64_t ms_direct_span(uint64_t offset, uint64_t len)
{
    return (ms_direct_head(offset) + len + MS_DIRECT_ALIGN - 1) / MS_DIRECT_ALIGN * MS_DIRECT_ALIGN;
}

/* Room beyond len that a block-aligned staging area for ms_direct_span of
 * len bytes needs, at most: up to a block less one byte to align its start
 * after another area, and up to two blocks less two bytes of span. */
#define MS_DIRECT_SLACK (3ull * MS_DIRECT_ALIGN)

/* Opens a read-only O_DIRECT descriptor of the file open as fd (through
 * /proc/self/fd, so it is the same file even if path was replaced; path when
 * /proc is missing, checked to be the same inode) and reads its first block
 * with it, so a file system that takes the flag but refuses the reads is
 * found here. Returns the descriptor, or -errno: -EINVAL when the file system
 * does not do O_DIRECT (also when MERGESTREAM_DIRECT_REFUSE=1, for tests). */
int ms_direct_open(int fd, const char *path);

#endif
