/* Tiny test harness shared by the C tests: counted checks that keep going after a failure,
 * fatal requirements, and capture of what the library prints on stderr during one call. */
#ifndef HBM_C_TESTS_CHECK_H
#define HBM_C_TESTS_CHECK_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int check_passed;
static int check_failed;

/* Counts a check; on failure prints where and why, and the test goes on. */
#define CHECK(cond, ...)                                                            \
    do {                                                                            \
        if (cond) {                                                                 \
            check_passed++;                                                         \
        } else {                                                                    \
            check_failed++;                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                           \
            fputc('\n', stderr);                                                    \
        }                                                                           \
    } while (0)

/* A check whose failure makes everything after it meaningless: stop at once. */
#define REQUIRE(cond, ...)                                                          \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "FATAL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
            fprintf(stderr, __VA_ARGS__);                                           \
            fputc('\n', stderr);                                                    \
            exit(1);                                                                \
        }                                                                           \
        check_passed++;                                                             \
    } while (0)

/* Prints the tally; the exit status for main. */
static int check_summary(const char *test) {
    printf("%s: %d checks passed, %d failed\n", test, check_passed, check_failed);
    fflush(stdout);
    return check_failed == 0 ? 0 : 1;
}

/* Redirects fd 2 into a temporary file between capture_begin and capture_end, so a test can
 * check the diagnostic line one call printed. Single-threaded use only (fd 2 is process-wide).
 * The library writes diagnostics straight to fd 2 (Rust's stderr is unbuffered); whatever was
 * captured is echoed to the real stderr afterwards so the log still shows it. */
typedef struct {
    int saved_fd;
    FILE *file;
} capture;

static void capture_begin(capture *c) {
    REQUIRE(fflush(stderr) == 0, "fflush(stderr): %s", strerror(errno));
    c->file = tmpfile();
    REQUIRE(c->file != NULL, "tmpfile: %s", strerror(errno));
    c->saved_fd = dup(STDERR_FILENO);
    REQUIRE(c->saved_fd >= 0, "dup(2): %s", strerror(errno));
    REQUIRE(dup2(fileno(c->file), STDERR_FILENO) == STDERR_FILENO, "dup2: %s", strerror(errno));
}

/* Restores stderr and copies what was captured into buf (NUL-terminated, truncated to fit). */
static void capture_end(capture *c, char *buf, size_t size) {
    REQUIRE(size > 0, "capture_end needs room for the terminator");
    fflush(stderr);
    REQUIRE(dup2(c->saved_fd, STDERR_FILENO) == STDERR_FILENO, "dup2: %s", strerror(errno));
    REQUIRE(close(c->saved_fd) == 0, "close: %s", strerror(errno));
    REQUIRE(fseek(c->file, 0, SEEK_SET) == 0, "fseek: %s", strerror(errno));
    size_t n = fread(buf, 1, size - 1, c->file);
    REQUIRE(!ferror(c->file), "fread of the captured stderr failed");
    buf[n] = '\0';
    REQUIRE(fclose(c->file) == 0, "fclose: %s", strerror(errno));
    fputs(buf, stderr);
}

#endif /* HBM_C_TESTS_CHECK_H */
