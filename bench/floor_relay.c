/*
 * The floor for the keep-alive benchmark: the least a proxy can cost on this
 * machine. Each client connection is paired with its own connection to one
 * fixed origin, and bytes are copied both ways with one recv and one send per
 * chunk: no parsing, no pool, no timers, no allocation. A real proxy makes at
 * least these system calls for each request, so this relay's CPU per request
 * is the kernel's share that no proxy can get under (bench/run.py measures it
 * in the same run as the proxies).
 *
 *   floor_relay LISTEN_PORT ORIGIN_PORT [THREADS]
 *
 * Loopback only. THREADS event loops (default 2) each accept on their own
 * SO_REUSEPORT listener. Sockets stay blocking for send: a send of one small
 * chunk does not block on loopback (and if it did, blocking is the simplest
 * correct way to finish it). An event in a batch can be stale once an earlier one
 * closed its pair and the descriptor number was reused (by any loop): each event
 * carries the descriptor's generation, and one from an older generation is
 * skipped; recv never blocks (MSG_DONTWAIT). Exits on SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536

static int listen_port, origin_port;
static int peer_of[MAX_FD];          /* the other end of each pair */
static unsigned generation[MAX_FD];  /* bumped when a descriptor is closed */

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int open_listener(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = loopback(listen_port);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) {
        perror("floor_relay: listen");
        exit(1);
    }
    return s;
}

static void watch(int ep, int fd) {
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = (uint64_t)generation[fd] << 32 | (uint32_t)fd;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void close_pair(int fd, int peer) {
    generation[fd]++;
    generation[peer]++;
    close(peer);
    close(fd);
}

/* Pair a new client with a new origin connection; drop the client if the origin refuses. */
static void pair(int ep, int client) {
    int origin = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = loopback(origin_port);
    if (client >= MAX_FD || origin < 0 || origin >= MAX_FD ||
        connect(origin, (struct sockaddr *)&a, sizeof a)) {
        close(client);
        if (origin >= 0) close(origin);
        return;
    }
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(origin, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    peer_of[client] = origin;
    peer_of[origin] = client;
    watch(ep, client);
    watch(ep, origin);
}

static void *event_loop(void *unused) {
    static __thread char buf[65536];
    struct epoll_event events[256];
    int listener = open_listener(), ep = epoll_create1(0);
    (void)unused;
    if (listener >= MAX_FD) exit(1);
    watch(ep, listener);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = (int)(uint32_t)events[i].data.u64;
            if ((unsigned)(events[i].data.u64 >> 32) != generation[fd]) continue; /* stale */
            if (fd == listener) {
                int client = accept(listener, NULL, NULL);
                if (client >= 0) pair(ep, client);
                continue;
            }
            int peer = peer_of[fd];
            ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (got < 0 && errno == EAGAIN) continue;
            if (got <= 0) { /* either side closed: close both (closing unwatches them) */
                close_pair(fd, peer);
                continue;
            }
            for (ssize_t sent = 0, k; sent < got; sent += k)
                if ((k = send(peer, buf + sent, got - sent, MSG_NOSIGNAL)) <= 0) break;
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t threads[64];
    int n = argc > 3 ? atoi(argv[3]) : 2;
    if (argc < 3 || n < 1 || n > 64) {
        fprintf(stderr, "usage: floor_relay LISTEN_PORT ORIGIN_PORT [THREADS 1-64]\n");
        return 2;
    }
    listen_port = atoi(argv[1]);
    origin_port = atoi(argv[2]);
    for (int i = 0; i < n; i++) pthread_create(&threads[i], NULL, event_loop, NULL);
    pause();
    return 0;
}
