// floor.c: the C side of the loopctl benchmark harness. Each operation
// makes the same system calls as loopctl's, in a tight loop, and prints the
// nanoseconds per operation: the limit that Go code making those calls can
// approach. Built by the harness with cc at run time.
//
// usage: floor OP N [FILE]
//   getfree  LOOP_CTL_GET_FREE on a control device opened once
//   cycle    attach FILE and detach it, with systemd's lock protocol, as
//            loopctl.AttachFile, Device.ClearFD and Device.Close do
//   scan     find a free device the old way: open /dev/loop0, 1, 2... and
//            ask LOOP_GET_STATUS64 until one answers ENXIO
//   list     every bound device's status, as loopctl.List reads it: the
//            backing_file attributes held open from one list to the next
//   find     the devices of FILE, as loopctl.FindByBackingFile reads them
//   list-fresh, find-fresh  the same, opening each backing_file afresh,
//            as losetup does
//   list-2threads, find-2threads  list and find on two threads, each
//            taking every other device
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/statfs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
	perror(what);
	exit(1);
}

static int ctl(void) {
	int fd = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/loop-control");
	return fd;
}

static int getfree(int n) {
	int c = ctl(), r = 0;
	for (int i = 0; i < n; i++)
		if ((r = ioctl(c, LOOP_CTL_GET_FREE)) < 0)
			die("LOOP_CTL_GET_FREE");
	return r;
}

// attach is one attempt; 0 means a lost race, to be tried again.
static int attach(int c, int file) {
	struct stat st;
	struct statfs sf;
	char path[32];
	if (fstat(file, &st) < 0)
		die("fstat");
	if (S_ISREG(st.st_mode) && fstatfs(file, &sf) < 0)
		die("fstatfs");
	if (flock(c, LOCK_EX | LOCK_NB) < 0 && (errno != EWOULDBLOCK || flock(c, LOCK_EX) < 0))
		die("flock /dev/loop-control");
	int n = ioctl(c, LOOP_CTL_GET_FREE);
	if (n < 0)
		die("LOOP_CTL_GET_FREE");
	snprintf(path, sizeof path, "/dev/loop%d", n);
	int d = open(path, O_RDWR | O_CLOEXEC);
	if (d < 0) {
		if (errno != ENXIO && errno != ENOENT && errno != ENODEV && errno != EBUSY)
			die(path);
		flock(c, LOCK_UN);
		return 0;
	}
	if (flock(d, LOCK_EX | LOCK_NB) < 0) {
		close(d);
		flock(c, LOCK_UN);
		return 0;
	}
	struct loop_config cfg = {.fd = file};
	if (ioctl(d, LOOP_CONFIGURE, &cfg) < 0) {
		if (errno != EBUSY)
			die("LOOP_CONFIGURE");
		close(d);
		flock(c, LOCK_UN);
		return 0;
	}
	uint64_t seq; // the binding's disk sequence number, as systemd reads it
	if (ioctl(d, BLKGETDISKSEQ, &seq) < 0 && errno != EINVAL && errno != ENOTTY)
		die("BLKGETDISKSEQ");
	flock(d, LOCK_UN);
	flock(c, LOCK_UN);
	return d;
}

static void cycle(int n, const char *name) {
	int c = ctl();
	int file = open(name, O_RDWR | O_CLOEXEC);
	if (file < 0)
		die(name);
	for (int i = 0; i < n; i++) {
		int d;
		while ((d = attach(c, file)) == 0)
			;
		if (ioctl(d, LOOP_CLR_FD) < 0)
			die("LOOP_CLR_FD");
		close(d);
	}
}

static int scan(int n) {
	int free = -1;
	for (int i = 0; i < n; i++) {
		for (int m = 0;; m++) {
			char path[32];
			struct loop_info64 info;
			snprintf(path, sizeof path, "/dev/loop%d", m);
			int d = open(path, O_RDONLY | O_CLOEXEC);
			if (d < 0)
				die(path);
			int r = ioctl(d, LOOP_GET_STATUS64, &info);
			close(d);
			if (r < 0 && errno == ENXIO) {
				free = m;
				break;
			}
		}
	}
	return free;
}

// A status is what loopctl's Status holds.
struct status {
	struct loop_info64 info;
	int block_size;
	uint64_t size, seq;
	char *file; // the backing file's name, allocated to its length as a
		    // Go string is: a first list then touches no more memory
		    // than loopctl's does
};

static struct status statuses[1 << 12];

// numbers lists the loop devices in the open /sys/devices/virtual/block.
static int numbers(int block, int *nums, int max) {
	char buf[8192];
	int count = 0;
	long got;
	lseek(block, 0, SEEK_SET);
	while ((got = syscall(SYS_getdents64, block, buf, sizeof buf)) > 0) {
		for (long off = 0; off < got;) {
			struct dirent64 *e = (struct dirent64 *)(buf + off);
			int m;
			char end;
			if (sscanf(e->d_name, "loop%d%c", &m, &end) == 1 && count < max)
				nums[count++] = m;
			off += e->d_reclen;
		}
	}
	return count;
}

// held[m] is device m's loop/backing_file held open, plus one; 0 if none.
static int held[1 << 16];
static int hold;

// backing reads loopN/loop/backing_file relative to the open
// /sys/devices/virtual/block; 0 if unbound. With hold, it keeps the
// attribute open and rereads it next time, from offset 0, as loopctl does;
// a descriptor of an earlier binding answers ENODEV and is replaced.
static int backing(int block, int m, char *out, size_t size) {
	if (hold && m < (1 << 16) && held[m]) {
		ssize_t got = pread(held[m] - 1, out, size - 1, 0);
		if (got >= 0 || errno != ENODEV) {
			out[got > 0 ? got : 0] = 0;
			return got > 0;
		}
		close(held[m] - 1);
		held[m] = 0;
	}
	char path[64];
	snprintf(path, sizeof path, "loop%d/loop/backing_file", m);
	int fd = openat(block, path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t got = pread(fd, out, size - 1, 0);
	out[got > 0 ? got : 0] = 0;
	if (hold && m < (1 << 16))
		held[m] = fd + 1;
	else
		close(fd);
	return got > 0;
}

// diskseq reads the binding's disk sequence number, 0 on a kernel without
// (before 5.15), as loopctl does.
static int diskseq(int d, uint64_t *seq) {
	*seq = 0;
	return ioctl(d, BLKGETDISKSEQ, seq) == 0 || errno == EINVAL || errno == ENOTTY;
}

// device asks device m for its status and, while it holds the device
// open, reads its backing file's name; 0 if it is not bound (to want).
static int device(int block, int m, struct status *s, const struct stat *want) {
	char path[32];
	snprintf(path, sizeof path, "/dev/loop%d", m);
	int d = open(path, O_RDONLY | O_CLOEXEC);
	if (d < 0)
		return 0;
	char name[4096 + 16];
	int ok = ioctl(d, LOOP_GET_STATUS64, &s->info) == 0 &&
		 (!want || (s->info.lo_device == want->st_dev && s->info.lo_inode == want->st_ino)) &&
		 ioctl(d, BLKSSZGET, &s->block_size) == 0 && ioctl(d, BLKGETSIZE64, &s->size) == 0 &&
		 diskseq(d, &s->seq) && backing(block, m, name, sizeof name);
	close(d);
	free(s->file);
	s->file = ok ? strdup(name) : NULL;
	return ok;
}

// The devices of one list, and the threads that share them: thread t of
// threads reads devices t, t + threads, ...
static int nums[1 << 12], count, block, threads = 1, stop;
static struct stat *want;
static int found_by[2];
static pthread_barrier_t begun, ended;

static int pass(int t) {
	int found = 0;
	for (int j = t; j < count; j += threads)
		found += device(block, nums[j], &statuses[j], want);
	return found;
}

static void *worker(void *arg) {
	int t = (int)(long)arg;
	for (;;) {
		pthread_barrier_wait(&begun);
		if (stop)
			return NULL;
		found_by[t] = pass(t);
		pthread_barrier_wait(&ended);
	}
}

// list lists the bound devices, or with file those of that file, stated
// anew each time as loopctl.FindByBackingFile does, on threads threads
// (1 or 2).
static int list(int n, const char *file) {
	struct stat st;
	int found = 0;
	pthread_t other;
	if (threads == 2) {
		pthread_barrier_init(&begun, NULL, 2);
		pthread_barrier_init(&ended, NULL, 2);
		pthread_create(&other, NULL, worker, (void *)1L);
	}
	for (int i = 0; i < n; i++) {
		if (file) {
			if (stat(file, &st) < 0)
				die(file);
			want = &st;
		}
		block = open("/sys/devices/virtual/block", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (block < 0)
			die("/sys/devices/virtual/block");
		count = numbers(block, nums, 1 << 12);
		if (threads == 2) {
			pthread_barrier_wait(&begun);
			found = pass(0);
			pthread_barrier_wait(&ended);
			found += found_by[1];
		} else {
			found = pass(0);
		}
		close(block);
	}
	if (threads == 2) {
		stop = 1;
		pthread_barrier_wait(&begun);
		pthread_join(other, NULL);
	}
	return found;
}

int main(int argc, char **argv) {
	if (argc < 3)
		return 2;
	const char *op = argv[1];
	int n = atoi(argv[2]);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (strcmp(op, "getfree") == 0)
		getfree(n);
	else if (strcmp(op, "cycle") == 0 && argc > 3)
		cycle(n, argv[3]);
	else if (strcmp(op, "scan") == 0)
		scan(n);
	else if (strncmp(op, "list", 4) == 0 || (strncmp(op, "find", 4) == 0 && argc > 3)) {
		const char *how = op + 4;
		if (strcmp(how, "") != 0 && strcmp(how, "-fresh") != 0 && strcmp(how, "-2threads") != 0)
			return 2;
		hold = strcmp(how, "-fresh") != 0;
		threads = strcmp(how, "-2threads") == 0 ? 2 : 1;
		list(n, op[0] == 'f' ? argv[3] : NULL);
	}
	else
		return 2;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
	printf("%.1f\n", n > 0 ? ns / n : 0);
	return 0;
}
