/*
 * greenhouse/alarm: answers the "alarm.status" command with the last temperature
 * the sensor module stored and whether it is above the configured threshold
 * (config {"threshold": N}; default 25).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge.h"

EDGE_EXPORT("edge_alloc") void *edge_alloc(int32_t size) { return malloc((size_t)size); }
EDGE_EXPORT("edge_free") void edge_free(void *ptr, int32_t size) { (void)size; free(ptr); }

static int threshold(void) {
    char cfg[512];
    uint32_t len = 0;
    if (edge_config_get(cfg, sizeof cfg - 1, &len) != EDGE_OK) return 25;
    cfg[len] = 0;
    const char *p = strstr(cfg, "\"threshold\":");
    return p ? atoi(p + 12) : 25;
}

EDGE_EXPORT("edge_on_event")
int32_t edge_on_event(int32_t kind, const char *name, int32_t name_len, const char *payload,
                      int32_t payload_len) {
    (void)payload; (void)payload_len;
    if (kind != EDGE_EVENT_COMMAND) return EDGE_OK;
    char value[32] = "null";
    uint32_t len = 0;
    if (edge_kv_get("last_temp", 9, value, sizeof value - 1, &len) == EDGE_OK) value[len] = 0;
    int limit = threshold();
    int alarm = strcmp(value, "null") != 0 && atoi(value) > limit;
    char reply[160];
    snprintf(reply, sizeof reply,
             "{\"command\": \"%.*s\", \"temperature\": %s, \"threshold\": %d, \"alarm\": %s}",
             (int)name_len, name, value, limit, alarm ? "true" : "false");
    return edge_publish_str("~/alarm", reply, 1);
}
