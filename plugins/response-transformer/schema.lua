local function operation(description, headers, json)
  return { type = "record", default = {}, description = description, fields = {
    headers = headers,
    json = json,
  } }
end

-- JSON body field values: scalars (YAML maps and lists are not values here).
local json_value = { type = "one_of", one_of = { { type = "string" }, { type = "number" }, { type = "boolean" } } }

return { fields = {
  remove = operation("applied first: response headers removed",
                     { type = "array", elements = { type = "string", min = 1 }, default = {},
                       description = "header names removed" },
                     { type = "array", elements = { type = "string", min = 1 }, default = {},
                       description = "JSON body field paths removed (a.b = field b of object a)" }),
  rename = operation("applied second: response headers renamed",
                     { type = "map", values = { type = "string" }, default = {},
                       description = "old name: new name; the header keeps its value(s) under the new name (only if present)" },
                     { type = "map", values = { type = "string" }, default = {},
                       description = "old path: new path; the field keeps its value under the new path (only if present)" }),
  replace = operation("applied third: values replaced where present",
                      { type = "map", values = { type = "string" }, default = {},
                        description = "name: value; replaces the header's value(s) only if the header is present" },
                      { type = "map", values = json_value, default = {},
                        description = "path: value (string, number, boolean); replaces the field's value only if present" }),
  add = operation("applied fourth: set where absent",
                  { type = "map", values = { type = "string" }, default = {},
                    description = "name: value; sets the header only if it is absent" },
                  { type = "map", values = json_value, default = {},
                    description = "path: value (string, number, boolean); sets the field only if absent (missing parent objects are created)" }),
  append = operation("applied last: one more line each",
                     { type = "map", values = { type = "string" }, default = {},
                       description = "name: value; adds one more line for the header (sets it when absent)" }),
  json_max_size = { type = "integer", default = 1048576, min = 1, max = 8388608,
                    description = "JSON body ops apply to bodies up to this many bytes; larger bodies (and non-JSON or compressed ones) pass unchanged" },
} }
