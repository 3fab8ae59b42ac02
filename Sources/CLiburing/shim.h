// Debian's liburing-dev (2.3). These system headers must come before <liburing.h>, or
// debug builds fail on fd_set ("'__fds_bits' ... is not present").
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/eventfd.h>
// liburing 2.3 ships its own copy of the uAPI header under the same include guard as the
// kernel's. swift-system's CSystem module includes the kernel's; including it first here
// makes both modules see one definition of `struct io_uring_sqe` (they differ otherwise).
#include <linux/io_uring.h>
#include <liburing.h>
