// floor.c: the C side of the loopctl benchmark harness. Each operation
// makes the same system calls as loopctl's, in a tight loop, holding
// nothing from one operation to the next, and prints the nanoseconds per
// operation: the limit that Go code making those calls can approach. Built
// by the harness with cc at run time.
//
// usage: floor OP N [THREADS [ARG [FIRST]]]
//   getfree  LOOP_CTL_GET_FREE on a control device opened once
//   cycle    attach ARG and detach it, with systemd's lock protocol, as
//            loopctl.AttachFile, Device.ClearFD and Device.Close do (with
//            the statx of the disk's sysfs directory that tells partitions
//            an earlier binding left, on kernels before 7.2)
//   scan     find a free device the old way: open /dev/loop0, 1, 2... and
//            ask LOOP_GET_STATUS64 until one answers ENXIO
//   list     every bound device's status, as loopctl.List reads it, on
//            THREADS threads: per device an faccessat of loopN/loop
//            relative to /sys/devices/virtual/block (ENOENT: not bound,
//            and nothing more), or, after a device whose backing_file it
//            read, the open of that attribute; then open,
//            LOOP_GET_STATUS64, BLKSSZGET, BLKGETSIZE64, BLKGETDISKSEQ, the
//            backing_file read, and both closes
//   list-open  the same, telling a bound device by opening it, as
//            programs did before: open and LOOP_GET_STATUS64 of every
//            device (ENXIO: not bound), then the rest for a bound one
//   find     the devices of the file ARG, as loopctl.FindByBackingFile
//            reads them: a stat of ARG; per device the check of list, open,
//            LOOP_GET_STATUS64, and for ARG's devices the rest as in list;
//            close
//   ref      the devices whose lo_file_name is ARG, as loopctl.FindByRef
//            (and Sweep, which then detaches what it found) reads them
//   attach   one attach of ARG, timed, as loopctl.AttachFile makes it;
//            then, untimed, its detach, and the removal of the device if
//            its number is FIRST or above (one LOOP_CTL_GET_FREE made
//            because every device was bound)
//   attach-reuse  the same, after looking for a device bound to ARG as
//            find does (loopctl.AttachFile with Options.Reuse, when there
//            is none to share)
// THREADS is 1 unless given; the threads take the devices in batches of 8.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
	perror(what);
	exit(1);
}

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
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

// keeps_partitions tells whether the kernel leaves partitions added by
// hand after a detach (before Linux 7.2), so that a binder looks for
// them first, as loopctl does with one statx of the disk's sysfs
// directory.
static int keeps_partitions(void) {
	static int keeps = -1;
	if (keeps < 0) {
		struct utsname u;
		int major = 0, minor = 0;
		if (uname(&u) == 0)
			sscanf(u.release, "%d.%d", &major, &minor);
		keeps = major < 7 || (major == 7 && minor < 2);
	}
	return keeps;
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
	// A file open read-only is bound read-only, through a read-only
	// descriptor of the device: AttachFile asks how the file is open.
	if (fcntl(file, F_GETFL) < 0)
		die("F_GETFL");
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
	if (keeps_partitions()) {
		struct statx sx;
		snprintf(path, sizeof path, "/sys/block/loop%d", n);
		if (statx(AT_FDCWD, path, 0, STATX_NLINK, &sx) < 0)
			die(path);
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
		    // Go string is
};

#define MAXDEVS (1 << 16)
static struct status statuses[MAXDEVS];

// numbers lists the loop devices in the open /sys/devices/virtual/block.
static int numbers(int block, int *nums, int max) {
	char buf[32 << 10];
	int count = 0;
	long got;
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

// What one look wants, and how it tells a bound device.
enum how { LIST, LIST_OPEN, FIND, REF };
static enum how how;
static struct stat want_file;
static const char *want_ref;
static int block;

// readattr reads the backing_file open as fd into s; 0 if it is empty.
static int readattr(int fd, struct status *s) {
	char name[4096 + 16];
	ssize_t got = pread(fd, name, sizeof name - 1, 0);
	if (got <= 0)
		return 0;
	name[got] = 0;
	s->file = strdup(name);
	return 1;
}

// name_read is whether this thread read the backing_file of the device
// it read last (bound, for list; the file's or the reference's, for find
// and ref): it then opens the next one's backing_file first, to tell
// whether it is bound, and asks faccessat after any other, as loopctl
// does.
static __thread int name_read;

// device reads device m's status into s, as loopctl does; 0 if it is not
// bound (as the look wants it). It holds nothing when it returns.
static int device(int m, struct status *s) {
	char path[64];
	int attr = -1;
	free(s->file);
	s->file = NULL;
	int was_read = name_read;
	name_read = 0;
	if (how != LIST_OPEN && was_read) {
		snprintf(path, sizeof path, "loop%d/loop/backing_file", m);
		if ((attr = openat(block, path, O_RDONLY | O_CLOEXEC)) < 0)
			return 0;
	} else if (how != LIST_OPEN) {
		snprintf(path, sizeof path, "loop%d/loop", m);
		if (faccessat(block, path, F_OK, 0) < 0)
			return 0;
	}
	snprintf(path, sizeof path, "/dev/loop%d", m);
	int d = open(path, O_RDONLY | O_CLOEXEC);
	int ok = d >= 0 && ioctl(d, LOOP_GET_STATUS64, &s->info) == 0;
	if (ok && how == FIND)
		ok = s->info.lo_device == want_file.st_dev && s->info.lo_inode == want_file.st_ino;
	if (ok && how == REF)
		ok = strcmp((char *)s->info.lo_file_name, want_ref) == 0;
	if (ok) {
		s->seq = 0;
		ok = ioctl(d, BLKSSZGET, &s->block_size) == 0 && ioctl(d, BLKGETSIZE64, &s->size) == 0 &&
		     (ioctl(d, BLKGETDISKSEQ, &s->seq) == 0 || errno == EINVAL || errno == ENOTTY);
	}
	if (ok && attr < 0) {
		snprintf(path, sizeof path, "loop%d/loop/backing_file", m);
		attr = openat(block, path, O_RDONLY | O_CLOEXEC);
	}
	ok = ok && attr >= 0 && readattr(attr, s);
	name_read = ok;
	if (d >= 0)
		close(d);
	if (attr >= 0)
		close(attr);
	return ok;
}

// The devices of one look, shared by the threads in batches of 8.
static int nums[MAXDEVS], count, threads = 1, stop;
static atomic_int next, found;
static pthread_barrier_t begun, ended;

static void pass(void) {
	int mine = 0;
	for (;;) {
		int i = atomic_fetch_add(&next, 8);
		if (i >= count)
			break;
		for (int j = i; j < i + 8 && j < count; j++)
			mine += device(nums[j], &statuses[j]);
	}
	atomic_fetch_add(&found, mine);
}

static void *worker(void *arg) {
	(void)arg;
	for (;;) {
		pthread_barrier_wait(&begun);
		if (stop)
			return NULL;
		pass();
		pthread_barrier_wait(&ended);
	}
}

static pthread_t others[64];

// look makes one look: the devices from the sysfs directory, then each
// read on the threads. Threads beyond the first are started at the first
// look (a first call in a new process pays for them, as a Go program's
// first pays for its threads) and kept for the next.
static int look(const char *arg) {
	static int started;
	if (threads > 1 && !started) {
		started = 1;
		pthread_barrier_init(&begun, NULL, threads);
		pthread_barrier_init(&ended, NULL, threads);
		for (long t = 1; t < threads; t++)
			pthread_create(&others[t], NULL, worker, NULL);
	}
	if (how == FIND && stat(arg, &want_file) < 0)
		die(arg);
	want_ref = arg;
	block = open("/sys/devices/virtual/block", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (block < 0)
		die("/sys/devices/virtual/block");
	count = numbers(block, nums, MAXDEVS);
	atomic_store(&next, 0);
	atomic_store(&found, 0);
	if (threads > 1) {
		pthread_barrier_wait(&begun);
		pass();
		pthread_barrier_wait(&ended);
	} else {
		pass();
	}
	close(block);
	return atomic_load(&found);
}

static void end_threads(void) {
	if (threads > 1) {
		stop = 1;
		pthread_barrier_wait(&begun);
		for (int t = 1; t < threads; t++)
			pthread_join(others[t], NULL);
	}
}

// attach_once attaches name, timed, and returns the nanoseconds; then it
// detaches, and removes a device numbered first or above.
static double attach_once(int c, int file, const char *name, int reuse, int first) {
	double t0 = now();
	if (reuse) {
		how = FIND;
		if (look(name) != 0) {
			fprintf(stderr, "%s is bound already: nothing to attach\n", name);
			exit(1);
		}
	}
	int d;
	while ((d = attach(c, file)) == 0)
		;
	double t = now() - t0;
	struct loop_info64 info;
	if (ioctl(d, LOOP_GET_STATUS64, &info) < 0)
		die("LOOP_GET_STATUS64");
	if (ioctl(d, LOOP_CLR_FD) < 0)
		die("LOOP_CLR_FD");
	close(d);
	if ((int)info.lo_number >= first) {
		// The teardown ends at the last close; udev may hold it a moment.
		for (int i = 0; ioctl(c, LOOP_CTL_REMOVE, info.lo_number) < 0; i++) {
			if (errno != EBUSY || i == 10000)
				die("LOOP_CTL_REMOVE");
			usleep(100);
		}
	}
	return t;
}

int main(int argc, char **argv) {
	if (argc < 3)
		return 2;
	const char *op = argv[1];
	int n = atoi(argv[2]);
	if (argc > 3)
		threads = atoi(argv[3]);
	if (threads < 1 || threads > 64)
		return 2;
	const char *arg = argc > 4 ? argv[4] : NULL;
	double t0 = now(), ns = -1;
	if (strcmp(op, "getfree") == 0)
		getfree(n);
	else if (strcmp(op, "cycle") == 0 && arg)
		cycle(n, arg);
	else if (strcmp(op, "scan") == 0)
		scan(n);
	else if (strcmp(op, "list") == 0 || strcmp(op, "list-open") == 0 || (strcmp(op, "find") == 0 && arg) ||
		 (strcmp(op, "ref") == 0 && arg)) {
		how = op[0] == 'f' ? FIND : op[0] == 'r' ? REF : op[4] ? LIST_OPEN : LIST;
		for (int i = 0; i < n; i++)
			look(arg);
		end_threads();
	} else if ((strcmp(op, "attach") == 0 || strcmp(op, "attach-reuse") == 0) && arg && argc > 5) {
		int c = ctl(), first = atoi(argv[5]);
		int file = open(arg, O_RDWR | O_CLOEXEC);
		if (file < 0)
			die(arg);
		ns = 0;
		for (int i = 0; i < n; i++)
			ns += attach_once(c, file, arg, op[6] == '-', first);
		end_threads();
	} else
		return 2;
	if (ns < 0)
		ns = now() - t0;
	printf("%.1f\n", n > 0 ? ns / n : 0);
	return 0;
}
