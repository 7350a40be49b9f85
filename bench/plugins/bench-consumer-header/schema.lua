return {
  fields = {
    header = { type = "string", default = "X-Consumer-Name",
               description = "upstream request header set to the consumer name" },
  },
}
