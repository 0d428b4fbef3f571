/* LD_PRELOAD shim that makes MKL VML's CPU-detection race happen in every run (tests only).
 *
 * On the first VML call of a process, MKL's mkl_vml_serv_cpu_detect stores the raw CPU id from
 * mkl_serv_vml_cpu_detect into a static, then replaces it by the id its kernel table uses. A
 * thread whose first VML call reads the static in between gets the raw id. This shim interposes
 * the two MKL functions that every thread's first VML call goes through (torch's libtorch_cpu
 * calls them through its PLT):
 *   mkl_vml_kernel_ReadEnvVarMode  threads after the first wait 1 ms, so they arrive mid-detection;
 *   mkl_serv_vml_cpu_detect        reports raw id CF_VML_RAW_ID (default: the real one), stores
 *                                  it where its caller is about to, and waits 5 ms.
 * The store happens only when the caller's next instruction is that store (mov %eax, disp(%rip));
 * the shim then creates the file named by CF_VML_ARMED. Without CF_VML_WIDEN it waits nowhere.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int callers;

static void *mkl_symbol(const char *name) { /* torch loads libtorch_cpu RTLD_LOCAL */
    void *library = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return library ? dlsym(library, name) : NULL;
}

static void pause_ms(long ms) {
    if (getenv("CF_VML_WIDEN")) {
        struct timespec duration = {0, ms * 1000000L};
        nanosleep(&duration, NULL);
    }
}

long mkl_vml_kernel_ReadEnvVarMode(void) {
    long (*real)(void) = (long (*)(void))mkl_symbol("mkl_vml_kernel_ReadEnvVarMode");
    long mode = real ? real() : -1;
    if (__atomic_fetch_add(&callers, 1, __ATOMIC_SEQ_CST) > 0) pause_ms(1);
    return mode;
}

int mkl_serv_vml_cpu_detect(void) {
    int (*real)(void) = (int (*)(void))mkl_symbol("mkl_serv_vml_cpu_detect");
    int raw = real ? real() : 0;
    const char *forced = getenv("CF_VML_RAW_ID");
    if (forced) raw = atoi(forced);
    unsigned char *next = (unsigned char *)__builtin_return_address(0);
    if (next[0] == 0x89 && next[1] == 0x05) {
        int32_t offset;
        memcpy(&offset, next + 2, sizeof offset);
        *(volatile int *)(next + 6 + offset) = raw;
        const char *armed = getenv("CF_VML_ARMED");
        if (armed) close(open(armed, O_CREAT | O_WRONLY, 0644));
        pause_ms(5);
    }
    return raw;
}
