/*
 * capsa's pause program: the first process of every pod sandbox.
 *
 * It holds the pod's namespaces open by doing nothing: it blocks in pause(), exits 0 on SIGINT
 * or SIGTERM, and, being PID 1 of the pod's PID namespace, reaps the children orphaned to it.
 * Built with `gcc -static -Os -s` so that the image needs nothing but this binary.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_terminate(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction terminate = {.sa_handler = on_terminate};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigemptyset(&terminate.sa_mask);
    sigemptyset(&child.sa_mask);
    if (sigaction(SIGINT, &terminate, NULL) != 0 || sigaction(SIGTERM, &terminate, NULL) != 0 ||
        sigaction(SIGCHLD, &child, NULL) != 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
