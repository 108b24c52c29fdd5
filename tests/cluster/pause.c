/*
 * The pod sandbox's pause process, built locally (no image is ever pulled).
 *
 * It holds the pod's namespaces open, reaps zombies it inherits as PID 1 of a
 * shared PID namespace, and exits cleanly on SIGINT/SIGTERM so the kubelet can
 * stop a sandbox quickly. Compiled `gcc -static -Os` into registry.k8s.io/pause.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "3.10-tpenv"

static void on_term(int sig) {
    /* _exit: async-signal-safe; nothing to flush. */
    _exit(sig == SIGINT || sig == SIGTERM ? 0 : 1);
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) {
            printf("pause.c %s\n", VERSION);
            return 0;
        }
    }
    if (getpid() != 1)
        fprintf(stderr, "Warning: pause should be the first process\n");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_term;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
        return 1;
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0)
        return 2;

    for (;;)
        pause();
    fprintf(stderr, "Error: infinite loop terminated\n");
    return 42;
}
