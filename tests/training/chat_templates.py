"""Two chat templates in the style of current model families, for the mask tests (written here, not copied):

- `QWEN3_STYLE`: ChatML turns (`<|im_start|>role ... <|im_end|>`), tools listed in the system turn, tool calls as
  `<tool_call>` JSON, tool results inside a user turn as `<tool_response>`, and Qwen3's history rewriting: an answer
  after the last user query is rendered with its `<think>` block (from `reasoning_content` or the content's own
  `<think>...</think>`; an empty one for the last turn), earlier answers without it, so a conversation's prefixes
  are not prefixes of its text.
- `LLAMA3_STYLE`: Llama 3.x headers (`<|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>`) after BOS, a
  system turn always written, tools as JSON in the system turn, tool calls as `{"name", "parameters"}` JSON, tool
  results under the `ipython` role.
"""

QWEN3_STYLE = """
{%- if tools or messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}
{%- if tools %}
{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}
{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}
{%- set content = m.content %}{%- set reasoning = '' %}
{%- if m.reasoning_content is defined and m.reasoning_content %}
{%- set reasoning = m.reasoning_content.strip('\n') %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}
{%- endif %}
{{- content }}
{%- for call in m.tool_calls or [] %}
{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson) }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif m.role == 'tool' %}
{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA3_STYLE = """
{{- bos_token }}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n' }}
{%- if messages[0].role == 'system' %}{{- '\\n' + messages[0].content }}{%- endif %}
{%- if tools %}
{{- '\\nYou may call these functions, answering with JSON {"name": ..., "parameters": ...}:' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for m in messages %}
{%- if m.role == 'user' %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}
{%- elif m.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- if m.tool_calls %}
{%- for call in m.tool_calls %}
{{- '{"name": "' + call.function.name + '", "parameters": ' + (call.function.arguments | tojson) + '}' }}
{%- endfor %}
{%- else %}{{- m.content }}{%- endif %}
{{- '<|eot_id|>' }}
{%- elif m.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
