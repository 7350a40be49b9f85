return { fields = {
  abort_percent = { type = "number", min = 0, max = 100, default = 0,
                    description = "percentage of requests answered by the gateway with abort_status instead of reaching the upstream" },
  abort_status = { type = "integer", min = 200, max = 599, default = 503,
                   description = "status of an aborted request" },
  abort_message = { type = "string", default = "fault injected",
                    description = "message of the JSON body of an aborted request" },
  delay_percent = { type = "number", min = 0, max = 100, default = 0,
                    description = "percentage of requests held for delay seconds before going on" },
  delay = { type = "number", min = 0, max = 300, default = 0,
            description = "seconds a delayed request is held (fractions allowed); the event loop keeps serving others" },
} }
