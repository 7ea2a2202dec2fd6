/*
 * counter: publishes a counter on every interval tick and answers commands.
 *
 * Triggers (declared in the desired entry or a bundle manifest):
 *   {"type": "interval", "name": "tick", "ms": 1000}
 *   {"type": "command", "command": "counter.get"}
 *   {"type": "command", "command": "counter.reset"}
 * Publishes ~/count ("<n>") on every tick, and ~/reply ({"count": n, "command": "..."})
 * to each command, which is also the command's response (edge_respond). The counter is
 * kept in the flow's storage: it survives restarts and upgrades.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge.h"

static uint32_t count;

static void save(void) { edge_kv_set("count", 5, &count, sizeof count); }

EDGE_EXPORT("edge_alloc") void *edge_alloc(int32_t size) { return malloc((size_t)size); }
EDGE_EXPORT("edge_free") void edge_free(void *ptr, int32_t size) { (void)size; free(ptr); }

EDGE_EXPORT("edge_on_event")
int32_t edge_on_event(int32_t kind, const char *name, int32_t name_len, const char *payload,
                      int32_t payload_len) {
    char buf[160];
    (void)payload;
    (void)payload_len;
    if (kind == EDGE_EVENT_STARTUP) {
        uint32_t len = 0;
        if (edge_kv_get("count", 5, &count, sizeof count, &len) != EDGE_OK) count = 0;
        snprintf(buf, sizeof buf, "counter starting at %u", (unsigned)count);
        edge_log_str(EDGE_LOG_INFO, buf);
    } else if (kind == EDGE_EVENT_INTERVAL) {
        count++;
        save();
        snprintf(buf, sizeof buf, "%u", (unsigned)count);
        edge_publish_str("~/count", buf, 1);
    } else if (kind == EDGE_EVENT_COMMAND) {
        if (name_len == 13 && memcmp(name, "counter.reset", 13) == 0) {
            count = 0;
            save();
        }
        snprintf(buf, sizeof buf, "{\"count\": %u, \"command\": \"%.*s\"}", (unsigned)count,
                 (int)name_len, name);
        edge_publish_str("~/reply", buf, 1);
        edge_respond_str(buf);
    }
    return EDGE_OK;
}
